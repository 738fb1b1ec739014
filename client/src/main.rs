//! `starling-cli`: a command-line Starling client built on the SDK.
//!
//! Every command prints human-readable lines, or with `--json` one JSON
//! object per line on stdout (shapes in `starling_client::json`). Errors go
//! to stderr (and, with `--json`, also as a `{"type":"error"}` object on
//! stdout); the exit status is then 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use starling_client::{
    Client, ClientConfig, ClientError, ConnectOptions, Connection, Event, Events, HistoryAnchor,
    Identifier, LoginCredential, Profile, Target, TlsTrust, Transport, json as sj, v1,
};

/// Starling command-line client.
#[derive(Debug, Parser)]
#[command(name = "starling-cli", version, about)]
struct Cli {
    /// Server address.
    #[arg(
        long,
        global = true,
        env = "STARLING_SERVER",
        default_value = "127.0.0.1:7443"
    )]
    server: String,
    /// CA certificate (PEM) to verify the server with, e.g. <data>/tls/ca.pem.
    #[arg(long, global = true, env = "STARLING_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Accept only the server whose certificate (end-entity, or one in its
    /// chain) has this SHA-256 fingerprint (hex, colons allowed).
    #[arg(
        long,
        global = true,
        env = "STARLING_PIN",
        value_name = "SHA256",
        conflicts_with = "ca"
    )]
    pin: Option<String>,
    /// Plain TCP without TLS (loopback benchmarks against a server with its
    /// plaintext listener enabled). Never use over a network.
    #[arg(long, global = true)]
    dangerous_plaintext: bool,
    /// Profile directory: credentials, cursors and the outbox.
    #[arg(long, global = true, env = "STARLING_PROFILE", value_name = "DIR")]
    profile: Option<PathBuf>,
    /// One JSON object per line on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the server before giving up.
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct IdArgs {
    /// Phone number in E.164 form, e.g. +14155550100.
    #[arg(long)]
    phone: Option<String>,
    /// E-mail address.
    #[arg(long)]
    email: Option<String>,
}

impl IdArgs {
    fn identifier(&self) -> Identifier {
        match (&self.phone, &self.email) {
            (Some(p), _) => Identifier::Phone(p.clone()),
            (None, Some(e)) => Identifier::Email(e.clone()),
            // clap's group makes exactly one present.
            (None, None) => Identifier::Phone(String::new()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show the server's version, limits and optional features (no sign-in needed).
    ServerInfo,
    /// Ask for a one-time code (dev server: appended to <data>/otp.log).
    RequestOtp(IdArgs),
    /// Verify a one-time code: registers the user if new, signs this device in.
    Verify {
        #[command(flatten)]
        id: IdArgs,
        /// The code.
        #[arg(long)]
        code: String,
        /// Display name for a new user.
        #[arg(long, default_value = "")]
        name: String,
        /// Name of this device.
        #[arg(long, default_value = "starling-cli")]
        device_name: String,
    },
    /// Sign in an existing user with a one-time code or the password.
    Login {
        #[command(flatten)]
        id: IdArgs,
        /// A code from request-otp.
        #[arg(
            long,
            conflicts_with = "password",
            required_unless_present = "password"
        )]
        code: Option<String>,
        /// The account password.
        #[arg(long)]
        password: Option<String>,
        /// Name of this device.
        #[arg(long, default_value = "starling-cli")]
        device_name: String,
    },
    /// End this session and forget its credentials.
    Logout,
    /// Show your profile.
    Me,
    /// Send a text message.
    Send {
        /// Recipient: a user id, a +phone, or conv:<conversation id>.
        #[arg(long)]
        to: String,
        /// The text.
        #[arg(long)]
        text: String,
    },
    /// Fetch everything new since the last sync and print it.
    Sync,
    /// Show a conversation's history.
    History {
        /// A user id, a +phone, or conv:<conversation id>.
        #[arg(long)]
        with: String,
        /// Most messages.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only messages before this seq.
        #[arg(long)]
        before: Option<u64>,
    },
    /// List your conversations.
    Chats {
        /// Most conversations.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Mark a conversation read up to a seq.
    Read {
        /// A user id, a +phone, or conv:<conversation id>.
        #[arg(long)]
        with: String,
        /// Highest seq read.
        #[arg(long)]
        up_to: u64,
    },
    /// Refuse messages from a user.
    Block {
        /// A user id or +phone.
        #[arg(long)]
        user: String,
    },
    /// Accept messages from a user again.
    Unblock {
        /// A user id or +phone.
        #[arg(long)]
        user: String,
    },
    /// Print live events (messages, receipts, connection changes).
    Watch {
        /// Stop after this many seconds.
        #[arg(long = "for", value_name = "SECS")]
        for_secs: u64,
    },
    /// Interactive chat: prints the conversation live, sends each stdin line.
    Chat {
        /// A user id, a +phone, or conv:<conversation id>.
        #[arg(long)]
        with: String,
    },
    /// Show (or clear) messages waiting in the outbox.
    Outbox {
        /// Drop every queued message.
        #[arg(long)]
        clear: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_mode = cli.json;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_mode {
                println!("{}", sj::error(&e));
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints results in the chosen format.
struct Out {
    json: bool,
}

impl Out {
    fn print(&self, v: &Value) {
        if self.json {
            println!("{v}");
        } else {
            println!("{}", human(v));
        }
    }
}

/// One readable line for a JSON result.
fn human(v: &Value) -> String {
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    match v["type"].as_str().unwrap_or_default() {
        "message" => {
            let body = if v.get("text").is_some() {
                s("text")
            } else {
                format!(
                    "<{} bytes of {}>",
                    s("body_hex").len() / 2,
                    s("content_type")
                )
            };
            format!(
                "[conv {} #{}] user {}: {body}",
                s("conversation_id"),
                s("seq"),
                s("sender_user_id")
            )
        }
        "sent" => format!(
            "sent: conv {} seq {} (client_msg_id {}{})",
            s("conversation_id"),
            s("seq"),
            s("client_msg_id"),
            if v["duplicate"] == true {
                ", duplicate"
            } else {
                ""
            }
        ),
        "receipt" => format!(
            "[conv {}] {} up to #{} by user {}",
            s("conversation_id"),
            s("kind"),
            s("up_to_seq"),
            s("by_user_id")
        ),
        "conversation" => format!(
            "conv {} ({}) {} peer {} last #{} unread {}",
            s("conversation_id"),
            s("kind"),
            s("title"),
            s("peer_user_id"),
            s("last_seq"),
            s("unread_count")
        ),
        "error" => format!("error: {} {}", s("code"), s("message")),
        "connected" => format!(
            "connected as user {} device {}",
            s("user_id"),
            s("device_id")
        ),
        "server" => format!(
            "{} (protocol {}), features: {}; limits: frames {} B, bodies {} B, {} requests in flight, ping every {} ms, idle timeout {} ms",
            s("server_version"),
            s("protocol_version"),
            v["features"]
                .as_array()
                .map(|f| f
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            s("frame_bytes_max"),
            s("body_bytes_max"),
            s("inflight_requests_max"),
            s("heartbeat_ms"),
            s("idle_timeout_ms")
        ),
        "disconnected" => format!(
            "disconnected: {} (retry in {} ms)",
            s("reason"),
            s("retry_in_ms")
        ),
        "synced" => format!(
            "synced: {} messages, {} receipts",
            s("messages"),
            s("receipts")
        ),
        _ => {
            // Generic: key=value pairs after the type.
            let mut line = s("type");
            if let Value::Object(map) = v {
                for (k, val) in map.iter().filter(|(k, _)| *k != "type") {
                    let val = match val {
                        Value::String(x) => x.clone(),
                        x => x.to_string(),
                    };
                    line.push_str(&format!(" {k}={val}"));
                }
            }
            line
        }
    }
}

struct Globals {
    connect: ConnectOptions,
    profile_dir: PathBuf,
    timeout: Duration,
}

fn globals(cli: &Cli) -> Result<Globals, ClientError> {
    let transport = if cli.dangerous_plaintext {
        Transport::DangerousPlaintext
    } else if let Some(pin) = &cli.pin {
        Transport::Tls(TlsTrust::parse_pin(pin)?)
    } else if let Some(ca) = &cli.ca {
        Transport::Tls(TlsTrust::CaFile(ca.clone()))
    } else {
        return Err(ClientError::InvalidArgument(
            "no way to trust the server: pass --ca FILE (the server's <data>/tls/ca.pem) or --pin SHA256"
                .to_owned(),
        ));
    };
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let mut connect = ConnectOptions::new(cli.server.clone(), transport);
    connect.client = v1::ClientInfo {
        app: "starling-cli".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        platform: std::env::consts::OS.to_owned(),
    };
    connect.connect_timeout = timeout;
    connect.request_timeout = timeout;
    let profile_dir = cli.profile.clone().unwrap_or_else(|| {
        std::env::var_os("HOME").map_or_else(
            || PathBuf::from(".starling"),
            |h| PathBuf::from(h).join(".starling"),
        )
    });
    Ok(Globals {
        connect,
        profile_dir,
        timeout,
    })
}

fn device(name: &str) -> v1::DeviceInfo {
    v1::DeviceInfo {
        name: name.to_owned(),
        platform: std::env::consts::OS.to_owned(),
    }
}

fn start(g: &Globals, receive: bool) -> Result<(Client, Events), ClientError> {
    let mut cfg = ClientConfig::new(g.connect.clone(), g.profile_dir.clone());
    cfg.receive_messages = receive;
    cfg.connected_wait = g.timeout;
    Client::start(cfg)
}

/// For commands that do not show events: drain them in the background.
fn discard(mut events: Events) {
    tokio::spawn(async move { while events.next().await.is_some() {} });
}

async fn run(cli: Cli) -> Result<(), ClientError> {
    let out = Out { json: cli.json };
    if let Cmd::Outbox { clear } = &cli.cmd {
        let dir = cli
            .profile
            .clone()
            .map_or_else(|| globals(&cli).map(|g| g.profile_dir), Ok)?;
        return outbox(&out, &Profile::open(dir)?, *clear);
    }
    let g = globals(&cli)?;
    match cli.cmd {
        Cmd::ServerInfo => {
            let (conn, _pushes, w) = Connection::connect_hello(&g.connect, None).await?;
            conn.close();
            out.print(&server_info(&w));
        }
        Cmd::RequestOtp(id) => {
            let sent = Client::request_otp(&g.connect, &id.identifier()).await?;
            out.print(&json!({
                "type": "otp_sent",
                "expires_at_ms": sent.expires_at_ms,
                "resend_after_ms": sent.resend_after_ms,
                "attempts_allowed": sent.attempts_allowed,
            }));
        }
        Cmd::Verify {
            id,
            code,
            name,
            device_name,
        } => {
            let profile = Profile::open(&g.profile_dir)?;
            let granted = Client::verify_otp(
                &g.connect,
                &profile,
                &id.identifier(),
                &code,
                &name,
                device(&device_name),
            )
            .await?;
            out.print(&sj::session(&granted));
        }
        Cmd::Login {
            id,
            code,
            password,
            device_name,
        } => {
            let credential = match (code, password) {
                (Some(c), _) => LoginCredential::OtpCode(c),
                (None, Some(p)) => LoginCredential::Password(p),
                (None, None) => {
                    return Err(ClientError::InvalidArgument("--code or --password".into()));
                }
            };
            let profile = Profile::open(&g.profile_dir)?;
            let granted = Client::login(
                &g.connect,
                &profile,
                &id.identifier(),
                credential,
                device(&device_name),
            )
            .await?;
            out.print(&sj::session(&granted));
        }
        Cmd::Logout => {
            let (client, events) = start(&g, false)?;
            discard(events);
            client.logout().await?;
            out.print(&json!({ "type": "logged_out", "user_id": client.user_id() }));
        }
        Cmd::Me => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = client.me().await;
            client.shutdown().await;
            out.print(&sj::profile(&res?));
        }
        Cmd::Send { to, text } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = send(&client, &to, &text, g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::Sync => {
            let (client, events) = start(&g, true)?;
            let res = sync(&out, events, g.timeout).await;
            client.shutdown().await;
            res?;
        }
        Cmd::History {
            with,
            limit,
            before,
        } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = history(&out, &client, &with, limit, before).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Chats { limit } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = client.conversations(limit, Vec::new()).await;
            client.shutdown().await;
            let list = res?;
            for c in &list.conversations {
                out.print(&sj::conversation(c));
            }
            if !list.next_cursor.is_empty() {
                out.print(
                    &json!({ "type": "more", "next_cursor_hex": hex::encode(&list.next_cursor) }),
                );
            }
        }
        Cmd::Read { with, up_to } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = async {
                let conv = conversation(&client, &with).await?;
                client.mark_read(conv, up_to).await?;
                Ok::<_, ClientError>(conv)
            }
            .await;
            client.shutdown().await;
            out.print(&json!({ "type": "read", "conversation_id": res?, "up_to_seq": up_to }));
        }
        Cmd::Block { user } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = async {
                let uid = client.resolve_user(&user).await?;
                client.block(uid).await?;
                Ok::<_, ClientError>(uid)
            }
            .await;
            client.shutdown().await;
            out.print(&json!({ "type": "blocked", "user_id": res? }));
        }
        Cmd::Unblock { user } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = async {
                let uid = client.resolve_user(&user).await?;
                client.unblock(uid).await?;
                Ok::<_, ClientError>(uid)
            }
            .await;
            client.shutdown().await;
            out.print(&json!({ "type": "unblocked", "user_id": res? }));
        }
        Cmd::Watch { for_secs } => {
            let (client, events) = start(&g, true)?;
            let res = watch(&out, events, Duration::from_secs(for_secs)).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Chat { with } => {
            let (client, events) = start(&g, true)?;
            let res = chat(&out, &client, events, &with, g.timeout).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Outbox { .. } => {}
    }
    Ok(())
}

/// What `server-info` prints: the Welcome of an unauthenticated connection.
fn server_info(w: &v1::Welcome) -> Value {
    let l = w.limits.unwrap_or_default();
    json!({
        "type": "server",
        "server_version": w.server_version,
        "protocol_version": w.protocol_version,
        "features": w.features,
        "frame_bytes_max": l.frame_bytes_max,
        "body_bytes_max": l.body_bytes_max,
        "inflight_requests_max": l.inflight_requests_max,
        "heartbeat_ms": l.heartbeat_ms,
        "idle_timeout_ms": l.idle_timeout_ms,
        "sync_messages_max": l.sync_messages_max,
    })
}

fn outbox(out: &Out, profile: &Profile, clear: bool) -> Result<(), ClientError> {
    let mut ob = profile.outbox()?;
    if clear {
        let n = ob.clear()?;
        out.print(&json!({ "type": "outbox_cleared", "removed": n }));
        return Ok(());
    }
    for e in ob.entries() {
        let to = match e.to {
            Target::User(u) => json!({ "user_id": u }),
            Target::Conversation(c) => json!({ "conversation_id": c }),
        };
        out.print(&json!({
            "type": "queued",
            "client_msg_id": e.client_msg_id.to_string(),
            "to": to,
            "content_type": e.content_type,
            "bytes": e.body.len(),
            "queued_at_ms": e.queued_at_ms,
        }));
    }
    Ok(())
}

/// `conv:N` → conversation N; anything else is a user.
async fn target(client: &Client, who: &str) -> Result<Target, ClientError> {
    if let Some(c) = who.strip_prefix("conv:") {
        return c
            .parse()
            .map(Target::Conversation)
            .map_err(|_| ClientError::InvalidArgument(format!("bad conversation id in {who:?}")));
    }
    Ok(Target::User(client.resolve_user(who).await?))
}

async fn conversation(client: &Client, who: &str) -> Result<u64, ClientError> {
    match target(client, who).await? {
        Target::Conversation(c) => Ok(c),
        Target::User(u) => client.conversation_with(u).await?.ok_or_else(|| {
            ClientError::InvalidArgument(format!("no conversation with user {u} yet"))
        }),
    }
}

async fn send(
    client: &Client,
    to: &str,
    text: &str,
    wait: Duration,
) -> Result<v1::SendAck, ClientError> {
    let to = target(client, to).await?;
    tokio::time::timeout(wait, client.send_text(to, text))
        .await
        .map_err(|_| ClientError::Timeout {
            what: "SendAck (the message stays in the outbox and will be retried)",
            after: wait,
        })?
}

async fn history(
    out: &Out,
    client: &Client,
    with: &str,
    limit: u32,
    before: Option<u64>,
) -> Result<(), ClientError> {
    let conv = conversation(client, with).await?;
    let anchor = before.map_or(HistoryAnchor::Latest, HistoryAnchor::Before);
    let page = client.history(conv, anchor, limit).await?;
    for m in &page.messages {
        out.print(&sj::message(m));
    }
    out.print(
        &json!({ "type": "history_end", "conversation_id": conv, "has_more": page.has_more }),
    );
    Ok(())
}

/// Prints events until `Synced`; a refused Sync or a lost session is an
/// error.
async fn sync(out: &Out, mut events: Events, wait: Duration) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut last_disconnect = None;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| match last_disconnect.take() {
                Some(reason) => ClientError::Closed(reason),
                None => ClientError::Timeout {
                    what: "end of the sync",
                    after: wait,
                },
            })?;
        match ev {
            None => return Err(ClientError::Stopped),
            Some(Event::SyncFailed(e)) => return Err(ClientError::Server(e)),
            Some(Event::LoggedOut { reason }) => return Err(ClientError::SessionLost(reason)),
            Some(ev @ Event::Synced { .. }) => {
                out.print(&sj::event(&ev));
                return Ok(());
            }
            Some(Event::Disconnected { reason, .. }) => last_disconnect = Some(reason),
            Some(Event::Connected { .. }) => {}
            Some(ev) => out.print(&sj::event(&ev)),
        }
    }
}

async fn watch(out: &Out, mut events: Events, for_: Duration) -> Result<(), ClientError> {
    let deadline = tokio::time::Instant::now() + for_;
    while let Ok(ev) = tokio::time::timeout_at(deadline, events.next()).await {
        let Some(ev) = ev else {
            return Err(ClientError::Stopped);
        };
        out.print(&sj::event(&ev));
        if let Event::LoggedOut { reason } = ev {
            return Err(ClientError::SessionLost(reason));
        }
    }
    Ok(())
}

async fn chat(
    out: &Out,
    client: &Client,
    mut events: Events,
    with: &str,
    wait: Duration,
) -> Result<(), ClientError> {
    let to = target(client, with).await?;
    let (peer, mut conv) = match to {
        Target::Conversation(c) => (None, Some(c)),
        Target::User(u) => (Some(u), client.conversation_with(u).await.ok().flatten()),
    };
    // stdin is read on a plain thread (the runtime has no io-std).
    let (line_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let (result_tx, mut results) = tokio::sync::mpsc::channel(16);
    let mut stdin_open = true;
    let mut sending = 0usize;
    loop {
        tokio::select! {
            line = lines.recv(), if stdin_open => match line {
                Some(line) if !line.trim().is_empty() => {
                    let client = client.clone();
                    let tx = result_tx.clone();
                    sending += 1;
                    tokio::spawn(async move {
                        let res = tokio::time::timeout(wait, client.send_text(to, &line)).await;
                        let _ = tx.send(res).await;
                    });
                }
                Some(_) => {}
                None => stdin_open = false,
            },
            Some(res) = results.recv() => {
                sending -= 1;
                match res {
                    Ok(Ok(ack)) => {
                        conv.get_or_insert(ack.conversation_id);
                        out.print(&sj::send_ack(&ack));
                    }
                    Ok(Err(e)) => print_error(out, &e),
                    Err(_) => print_error(out, &ClientError::Timeout { what: "SendAck (kept in the outbox)", after: wait }),
                }
            }
            ev = events.next() => {
                let Some(ev) = ev else { return Err(ClientError::Stopped) };
                let show = match &ev {
                    Event::Message(m) => {
                        if conv.is_none() && peer == Some(m.sender_user_id) {
                            conv = Some(m.conversation_id);
                        }
                        conv == Some(m.conversation_id)
                    }
                    Event::Receipt(r) => conv == Some(r.conversation_id),
                    Event::Typing(t) => conv == Some(t.conversation_id),
                    Event::Sent(_) | Event::Connected { .. } | Event::Presence(_) => false,
                    _ => true,
                };
                if show {
                    out.print(&sj::event(&ev));
                }
                match ev {
                    Event::LoggedOut { reason } => return Err(ClientError::SessionLost(reason)),
                    Event::SyncFailed(e) => return Err(ClientError::Server(e)),
                    _ => {}
                }
            }
        }
        if !stdin_open && sending == 0 {
            return Ok(());
        }
    }
}

fn print_error(out: &Out, e: &ClientError) {
    if out.json {
        println!("{}", sj::error(e));
    } else {
        eprintln!("error: {e}");
    }
}
