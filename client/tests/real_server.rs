//! Against the real `starling` binary (built on demand from this
//! workspace): the CLI's account flow, TLS trust by CA file and by pin,
//! messaging between two users (send, sync, history, chats, read, block),
//! and the SDK's token refresh and reconnect.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use starling_client::{
    Client, ClientConfig, ConnectOptions, Event, Identifier, Profile, TlsTrust, Transport, v1,
};

#[path = "../../testsupport/server_binary.rs"]
mod server_binary;

/// `target/<profile>/starling`, built if needed.
fn server_binary() -> PathBuf {
    server_binary::server_binary_beside(Path::new(env!("CARGO_BIN_EXE_starling-cli")))
}

struct Server {
    child: Child,
    data: PathBuf,
    addr: SocketAddr,
}

impl Server {
    fn start(bin: &Path, data: &Path, listen: &str) -> Server {
        Server::start_with(bin, data, listen, "")
    }

    /// [`Server::start`] with a configuration file of `toml`.
    fn start_with(bin: &Path, data: &Path, listen: &str, toml: &str) -> Server {
        // The server's stderr goes beside the data dir, so that a start that fails shows why.
        let err_path = data.with_extension("stderr");
        let err_file = std::fs::File::create(&err_path).unwrap();
        let cfg = data.with_extension("toml");
        std::fs::write(&cfg, toml).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--shards", "1", "--metrics-listen", "off"])
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", listen])
            .env("STARLING_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
                let _ = child.kill();
                let _ = child.wait();
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                panic!("server did not become ready; its stderr:\n{err}");
            };
            if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
                addr = Some(a.parse().unwrap());
            } else if line == "ready" {
                break;
            }
        }
        Server {
            child,
            data: data.to_owned(),
            addr: addr.unwrap(),
        }
    }

    fn ca(&self) -> PathBuf {
        self.data.join("tls/ca.pem")
    }

    /// The latest code sent to `identifier` (dev sender: `<data>/otp.log`).
    fn otp(&self, identifier: &str) -> String {
        let log = std::fs::read_to_string(self.data.join("otp.log")).unwrap();
        log.lines()
            .rev()
            .filter_map(|l| l.split_once(' '))
            .find(|(id, _)| *id == identifier)
            .map(|(_, code)| code.trim().to_owned())
            .expect("no code in otp.log")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cli<'a> {
    server: &'a Server,
    profile: PathBuf,
}

impl Cli<'_> {
    /// Runs `starling-cli --json` with the CA file and returns (ok, JSON lines).
    fn run(&self, args: &[&str]) -> (bool, Vec<Value>) {
        let ca = self.server.ca();
        self.run_with(&["--ca", ca.to_str().unwrap()], args)
    }

    fn run_with(&self, trust: &[&str], args: &[&str]) -> (bool, Vec<Value>) {
        let out: Output = Command::new(env!("CARGO_BIN_EXE_starling-cli"))
            .args(["--json", "--server"])
            .arg(self.server.addr.to_string())
            .arg("--profile")
            .arg(&self.profile)
            .args(trust)
            .args(if trust.contains(&"--timeout") {
                &[][..]
            } else {
                &["--timeout", "5"][..]
            })
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let lines = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        (out.status.success(), lines)
    }
}

#[test]
fn cli_account_flow_and_messaging() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = Cli {
        server: &server,
        profile: tmp.path().join("profile"),
    };
    let phone = "+15550100001";

    // What the server offers, before signing in.
    let (ok, out) = cli.run(&["server-info"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "server");
    assert!(
        out[0]["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "messaging"),
        "{out:?}"
    );
    assert!(out[0]["inflight_requests_max"].as_u64().unwrap() > 0);

    let (ok, out) = cli.run(&["request-otp", "--phone", phone]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "otp_sent");
    assert_eq!(out[0]["attempts_allowed"], 5);

    let code = server.otp(phone);
    let (ok, out) = cli.run(&["verify", "--phone", phone, "--code", &code, "--name", "Ana"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "session");
    assert_eq!(out[0]["new_user"], true);
    assert!(out[0].get("access_token").is_none(), "tokens never printed");
    let user_id = out[0]["user_id"].as_u64().unwrap();

    let (ok, out) = cli.run(&["me"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "profile");
    assert_eq!(out[0]["user_id"], user_id);
    assert_eq!(out[0]["display_name"], "Ana");
    assert_eq!(out[0]["phone"], phone);

    // Trust by pin: the server's end-entity certificate.
    use rustls::pki_types::pem::PemObject as _;
    let leaf = rustls::pki_types::CertificateDer::from_pem_file(server.data.join("tls/server.pem"))
        .unwrap();
    let pin = starling_client::fingerprint(&leaf);
    let (ok, out) = cli.run_with(&["--pin", &pin], &["me"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["user_id"], user_id);
    let wrong = "00".repeat(32);
    let (ok, out) = cli.run_with(&["--pin", &wrong, "--timeout", "1"], &["me"]);
    assert!(!ok);
    assert!(
        out[0]["message"].as_str().unwrap().contains("tls"),
        "{out:?}"
    );

    // Messaging: a second user, Ben; Ana sends to him, he syncs and reads.
    let ben = Cli {
        server: &server,
        profile: tmp.path().join("profile-ben"),
    };
    let ben_phone = "+15550100003";
    let (ok, out) = ben.run(&["request-otp", "--phone", ben_phone]);
    assert!(ok, "{out:?}");
    let code = server.otp(ben_phone);
    let (ok, out) = ben.run(&[
        "verify", "--phone", ben_phone, "--code", &code, "--name", "Ben",
    ]);
    assert!(ok, "{out:?}");
    let ben_id = out[0]["user_id"].as_u64().unwrap();
    let to = ben_id.to_string();
    let (ok, out) = cli.run(&["send", "--to", &to, "--text", "hi"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "sent");
    assert_eq!(out[0]["seq"], 1);
    assert_eq!(out[0]["duplicate"], false);
    let conv = out[0]["conversation_id"].as_u64().unwrap();
    // Acknowledged, so the outbox is empty again.
    let (ok, out) = cli.run(&["outbox"]);
    assert!(ok);
    assert!(out.is_empty(), "{out:?}");

    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let msg = out
        .iter()
        .find(|v| v["type"] == "message")
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(msg["text"], "hi");
    assert_eq!(msg["sender_user_id"], user_id);
    assert_eq!(msg["seq"], 1);
    assert_eq!(out.last().unwrap()["type"], "synced", "{out:?}");

    let with = format!("conv:{conv}");
    let (ok, out) = ben.run(&["history", "--with", &with]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "message", "{out:?}");
    assert_eq!(out[0]["text"], "hi");
    assert_eq!(out.last().unwrap()["type"], "history_end");
    let (ok, out) = ben.run(&["chats"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "conversation", "{out:?}");
    assert_eq!(out[0]["conversation_id"], conv);
    assert_eq!(out[0]["peer_user_id"], user_id);
    assert_eq!(out[0]["last_seq"], 1);
    let (ok, out) = ben.run(&["read", "--with", &with, "--up-to", "1"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "read");
    let user = user_id.to_string();
    let (ok, out) = ben.run(&["block", "--user", &user]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "blocked");
    // Blocked: Ana's next message is refused.
    let (ok, out) = cli.run(&["send", "--to", &to, "--text", "still there?"]);
    assert!(!ok, "{out:?}");
    assert_eq!(out[0]["type"], "error");
    assert_eq!(out[0]["code"], "BLOCKED", "{out:?}");
    // A refusal is final: the message does not wait in the outbox.
    let (ok, out) = cli.run(&["outbox"]);
    assert!(ok);
    assert!(out.is_empty(), "{out:?}");

    let (ok, out) = cli.run(&["logout"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "logged_out");
    let (ok, out) = cli.run(&["me"]);
    assert!(!ok);
    assert!(
        out[0]["message"]
            .as_str()
            .unwrap()
            .contains("not logged in")
    );

    // Login again with a new code.
    let (ok, _) = cli.run(&["request-otp", "--phone", phone]);
    assert!(ok);
    let code2 = server.otp(phone);
    let (ok, out) = cli.run(&["login", "--phone", phone, "--code", &code2]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["user_id"], user_id);
    assert_eq!(out[0]["new_user"], false);
}

/// An SDK client of the profile in `profile` on `server`, once its first Sync is done.
async fn synced_client(server: &Server, profile: &Path) -> (Client, starling_client::Events) {
    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let (c, mut events) = Client::start(ClientConfig::new(connect, profile)).unwrap();
    loop {
        if let Event::Synced { .. } = next(&mut events).await {
            return (c, events);
        }
    }
}

async fn next(events: &mut starling_client::Events) -> Event {
    tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("no event in time")
        .expect("client stopped")
}

#[tokio::test]
async fn sdk_refreshes_an_expired_token_and_reconnects_after_a_restart() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&bin, &data, "127.0.0.1:0");
    let mut connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    connect.request_timeout = Duration::from_secs(5);
    let profile = Profile::open(tmp.path().join("profile")).unwrap();
    let phone = Identifier::Phone("+15550100002".to_owned());
    Client::request_otp(&connect, &phone).await.unwrap();
    let device = v1::DeviceInfo {
        name: "test".into(),
        platform: "linux".into(),
    };
    let granted = Client::verify_otp(
        &connect,
        &profile,
        &phone,
        &server.otp("+15550100002"),
        "Bo",
        device,
    )
    .await
    .unwrap();

    // Pretend the access token expired: the client must refresh.
    let mut creds = profile.credentials().unwrap().unwrap();
    creds.access_expires_at_ms = 0;
    profile.save_credentials(&creds).unwrap();

    let mut cfg = ClientConfig::new(connect, profile.dir());
    cfg.receive_messages = false;
    cfg.backoff.base = Duration::from_millis(50);
    cfg.backoff.cap = Duration::from_millis(300);
    let (client, mut events) = Client::start(cfg).unwrap();
    assert!(
        matches!(next(&mut events).await, Event::Connected { user_id, .. } if user_id == granted.user_id)
    );
    assert_eq!(client.me().await.unwrap().user_id, granted.user_id);
    let refreshed = profile.credentials().unwrap().unwrap();
    assert_ne!(
        refreshed.refresh_token, creds.refresh_token,
        "refresh token rotated"
    );
    assert!(refreshed.access_expires_at_ms > 0);

    // Kill the server: the client notices, backs off, and reconnects once
    // the server is back on the same address.
    let addr = server.addr;
    server.kill();
    match next(&mut events).await {
        Event::Disconnected { retry_in, .. } => assert!(retry_in <= Duration::from_millis(300)),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let _server = Server::start(&bin, &data, &addr.to_string());
    loop {
        match next(&mut events).await {
            Event::Connected { .. } => break,
            Event::Disconnected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(client.me().await.unwrap().display_name, "Bo");
    client.shutdown().await;
}

/// A token the server refuses in Hello (here a malformed one the client still believes
/// valid): the server welcomes the connection with `auth_error`, and the SDK refreshes on that
/// same connection instead of failing or saying Hello again.
#[tokio::test]
async fn sdk_refreshes_in_place_when_hello_refuses_its_token() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let profile = Profile::open(tmp.path().join("profile")).unwrap();
    let phone = Identifier::Phone("+15550100003".to_owned());
    Client::request_otp(&connect, &phone).await.unwrap();
    let device = v1::DeviceInfo {
        name: "test".into(),
        platform: "linux".into(),
    };
    let code = server.otp("+15550100003");
    let granted = Client::verify_otp(&connect, &profile, &phone, &code, "Cy", device)
        .await
        .unwrap();
    let mut creds = profile.credentials().unwrap().unwrap();
    creds.access_token = "not.a.token".to_owned();
    profile.save_credentials(&creds).unwrap();

    let mut cfg = ClientConfig::new(connect, profile.dir());
    cfg.receive_messages = false;
    let (client, mut events) = Client::start(cfg).unwrap();
    match next(&mut events).await {
        Event::Connected {
            user_id, features, ..
        } => {
            assert_eq!(user_id, granted.user_id);
            assert!(features.iter().any(|f| f == "messaging"), "{features:?}");
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    assert_eq!(client.me().await.unwrap().user_id, granted.user_id);
    let refreshed = profile.credentials().unwrap().unwrap();
    assert_ne!(refreshed.access_token, "not.a.token");
    assert_ne!(refreshed.refresh_token, creds.refresh_token);
    let features = client.server_features().await.unwrap();
    assert!(!features.iter().any(|f| f == "media"), "{features:?}");
    client.shutdown().await;
}

#[path = "real_server/changes.rs"]
mod changes;
#[path = "real_server/contacts.rs"]
mod contacts;
#[path = "real_server/disappearing.rs"]
mod disappearing;
#[path = "real_server/e2e.rs"]
mod e2e;
#[path = "real_server/e2e_chat.rs"]
mod e2e_chat;
#[path = "real_server/groups.rs"]
mod groups;
#[path = "real_server/keys.rs"]
mod keys;
#[path = "real_server/media.rs"]
mod media;
#[path = "real_server/presence.rs"]
mod presence;
#[path = "real_server/profile.rs"]
mod profile;
#[path = "real_server/push.rs"]
mod push;
#[path = "real_server/receipts.rs"]
mod receipts;
