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
use serde_json::json;
use starling_client::{
    Client, ClientConfig, ClientError, ConnectOptions, Connection, Events, Identifier,
    LoginCredential, Profile, TlsTrust, Transport, json as sj, v1,
};

mod cli {
    pub(crate) mod chat;
    pub(crate) mod e2e;
    pub(crate) mod groups;
    pub(crate) mod keys;
    pub(crate) mod media;
    pub(crate) mod messaging;
    pub(crate) mod out;
    pub(crate) mod presence;
    pub(crate) mod push;
}

use cli::groups::GroupCmd;
use cli::keys::KeysCmd;
use cli::messaging::{Change, conversation, history, outbox, send, server_info, sync, watch};
use cli::out::Out;
use cli::presence::PresenceCmd;
use cli::push::PushCmd;

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
    /// Send a text message, or a file (uploaded to the server's media endpoint first) with
    /// an optional caption.
    Send {
        /// Recipient: a user id, a +phone, conv:<conversation id> or
        /// group:<conversation id>.
        #[arg(long)]
        to: String,
        /// The text (the caption, with --file).
        #[arg(long, default_value = "", required_unless_present = "file")]
        text: String,
        /// A file to attach.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// The file's content type (must be one the server accepts).
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// End-to-end encrypt the text with Olm for every device of the recipient (a user)
        /// and your other devices (run `keys upload` first).
        #[arg(long, conflicts_with = "file")]
        e2e: bool,
        /// Send the text as a reply to the message with this seq (in the same conversation).
        #[arg(long, conflicts_with_all = ["file", "e2e"])]
        reply_to: Option<u64>,
    },
    /// Edit one of your messages (within the server's edit window): its new text.
    Edit {
        /// The conversation: a user id, a +phone, conv:<conversation id> or group:<id>.
        conv: String,
        /// The message's seq.
        seq: u64,
        /// The new text.
        text: String,
    },
    /// Delete a message for everyone (yours within the server's delete window; anyone's in a
    /// group you administer).
    Delete {
        /// The conversation: a user id, a +phone, conv:<conversation id> or group:<id>.
        conv: String,
        /// The message's seq.
        seq: u64,
    },
    /// React to a message with an emoji, replacing your earlier reaction; "" removes it.
    React {
        /// The conversation: a user id, a +phone, conv:<conversation id> or group:<id>.
        conv: String,
        /// The message's seq.
        seq: u64,
        /// The reaction (at most 64 bytes).
        emoji: String,
    },
    /// Turn on disappearing messages in a conversation (messages sent from now on disappear
    /// SECONDS after the server accepted them), or off with 0.
    Timer {
        /// The conversation: a user id, a +phone, conv:<conversation id> or group:<id>.
        conv: String,
        /// The timer: 0 (off) or from 5 to 31536000 (one year).
        seconds: u64,
    },
    /// Download the attachment of a message (--conversation and --seq), or a user's avatar
    /// (--user), into a file (its SHA-256 is checked).
    Download {
        /// The conversation of the message.
        #[arg(long, requires = "seq", required_unless_present = "user")]
        conversation: Option<u64>,
        /// The message's seq.
        #[arg(long, requires = "conversation")]
        seq: Option<u64>,
        /// Or: the user whose avatar it is.
        #[arg(long, conflicts_with_all = ["conversation", "seq"])]
        user: Option<u64>,
        /// The media id (from the message's media).
        #[arg(long)]
        media_id: String,
        /// Where to write it.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Set your profile's avatar from an image file (uploaded first), or remove it.
    Avatar {
        /// The image.
        #[arg(long, required_unless_present = "clear")]
        file: Option<std::path::PathBuf>,
        /// Its content type (must be one the server accepts).
        #[arg(long, default_value = "image/jpeg")]
        content_type: String,
        /// Remove the avatar.
        #[arg(long, conflicts_with = "file")]
        clear: bool,
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
    /// Interactive chat: prints the conversation live (with who is typing),
    /// sends each stdin line, and tells the others while you type.
    Chat {
        /// A user id, a +phone, conv:<id> or group:<id>.
        #[arg(long)]
        with: String,
        /// End-to-end encrypt each line with Olm, as `send --e2e` does (a user only; run
        /// `keys upload` first). Received end-to-end messages are shown decrypted either way.
        #[arg(long)]
        e2e: bool,
    },
    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Show, watch or set presence.
    #[command(subcommand)]
    Presence(PresenceCmd),
    /// End-to-end keys: upload this device's, count them, fetch a user's
    /// bundles.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Show who received and read one message of a group (or any
    /// conversation).
    Receipts {
        /// group:<id>, conv:<id> or the conversation id.
        #[arg(long)]
        group: String,
        /// The message's seq.
        #[arg(long)]
        seq: u64,
    },
    /// Change your display name or status text (others see the new name at
    /// once: conversation titles, profiles).
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["name", "about"])))]
    SetProfile {
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New status text.
        #[arg(long)]
        about: Option<String>,
    },
    /// List your devices, with when each was last seen.
    Devices,
    /// Show other users' public profiles.
    Profiles {
        /// User ids or +phones, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
    },
    /// Register or forget this device's push token.
    #[command(subcommand)]
    Push(PushCmd),
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
        Cmd::Send {
            to,
            text,
            file: None,
            e2e: true,
            ..
        } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::e2e::send(&out, &client, &g.profile_dir, &to, &text).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Send {
            to,
            text,
            file: None,
            reply_to,
            ..
        } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = send(&client, &to, &text, reply_to, g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::Edit { conv, seq, text } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res =
                cli::messaging::change(&client, &conv, seq, Change::Edit(&text), g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::Delete { conv, seq } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::messaging::change(&client, &conv, seq, Change::Delete, g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::React { conv, seq, emoji } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res =
                cli::messaging::change(&client, &conv, seq, Change::React(&emoji), g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::Timer { conv, seconds } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::messaging::set_timer(&client, &conv, seconds, g.timeout).await;
            client.shutdown().await;
            out.print(&sj::send_ack(&res?));
        }
        Cmd::Send {
            to,
            text,
            file: Some(file),
            content_type,
            ..
        } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::media::send_file(&out, &client, &to, &text, &file, &content_type).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Download {
            conversation,
            seq,
            user,
            media_id,
            out: dest,
        } => {
            let of = match (conversation.zip(seq), user) {
                (_, Some(u)) => cli::media::Of::Avatar(u),
                (Some((c, s)), None) => cli::media::Of::Message(c, s),
                (None, None) => {
                    return Err(ClientError::InvalidArgument(
                        "name a message (--conversation and --seq) or a user (--user)".into(),
                    ));
                }
            };
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::media::download(&out, &client, of, &media_id, &dest).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Avatar {
            file,
            content_type,
            clear,
        } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res =
                cli::media::avatar(&out, &client, file.as_deref(), &content_type, clear).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Sync => {
            let (client, events) = start(&g, true)?;
            let mut reader = cli::e2e::Reader::new(&client, &g.profile_dir);
            let res = sync(&out, &mut reader, events, g.timeout).await;
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
            let mut reader = cli::e2e::Reader::new(&client, &g.profile_dir);
            let res = history(&out, &client, &mut reader, &with, limit, before).await;
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
            let mut reader = cli::e2e::Reader::new(&client, &g.profile_dir);
            let res = watch(&out, &mut reader, events, Duration::from_secs(for_secs)).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Chat { with, e2e } => {
            let (client, events) = start(&g, true)?;
            let mut reader = cli::e2e::Reader::new(&client, &g.profile_dir);
            let res =
                cli::chat::chat(&out, &client, &mut reader, events, &with, g.timeout, e2e).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Group(cmd) => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::groups::run(&out, &client, cmd).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Presence(cmd) => {
            let (client, events) = start(&g, false)?;
            let res = cli::presence::run(&out, &client, events, cmd).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Keys(cmd) => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::keys::run(&out, &client, &g.profile_dir, cmd).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Receipts { group, seq } => {
            let conv = cli::groups::group_id(&group)?;
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = client.receipts(conv, seq).await;
            client.shutdown().await;
            out.print(&sj::receipt_detail(&res?));
        }
        Cmd::SetProfile { name, about } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = client
                .update_profile(v1::UpdateProfile {
                    display_name: name,
                    about,
                    ..v1::UpdateProfile::default()
                })
                .await;
            client.shutdown().await;
            out.print(&sj::profile(&res?));
        }
        Cmd::Devices => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = client.devices().await;
            client.shutdown().await;
            for d in &res?.devices {
                out.print(&sj::device(d));
            }
        }
        Cmd::Profiles { users } => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = async {
                let ids = cli::messaging::users(&client, &users).await?;
                client.profiles(&ids).await
            }
            .await;
            client.shutdown().await;
            for p in &res? {
                out.print(&sj::public_profile(p));
            }
        }
        Cmd::Push(cmd) => {
            let (client, events) = start(&g, false)?;
            discard(events);
            let res = cli::push::run(&out, &client, cmd).await;
            client.shutdown().await;
            res?;
        }
        Cmd::Outbox { .. } => {}
    }
    Ok(())
}
