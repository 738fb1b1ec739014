//! Issue 36 §1/§6: the operator webhook through the real binary, against a local HTTPS relay
//! that does what an operator's relay must: it refuses a request whose `Starling-Timestamp`
//! is more than five minutes off (400) or whose `Starling-Signature` is not HMAC-SHA256 of
//! "<timestamp>." and the body under the shared secret (401), then answers per device token
//! from a script. An offline device of each platform gets one signed, content-free POST per
//! collapse interval; a 503 is retried with the same notification id; a 410 removes the
//! token; a relay refusing the signature gives a dead letter; a platform the webhook does not
//! serve is not sent; bad `[push.webhook]` settings stop the start.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender};

use base64::Engine as _;
use starling_storage::AccountStore as _;
use starling_storage::push::PushStore as _;
use starling_storage::{DeviceId, EmbeddedMeta, UserId};

use super::messaging::call;
use super::push_web::{has_push_token, meta_after_kill, metric, send, user};
use super::*;

/// How far a request's timestamp may be from the relay's clock.
const TIMESTAMP_SKEW_S: u64 = 300;

/// One request the relay received, and its answer.
#[derive(Debug, Clone)]
struct Relayed {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Relayed {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A local relay over HTTPS with a certificate of its own CA.
struct Relay {
    port: u16,
    ca_pem: PathBuf,
    got: Receiver<Relayed>,
    /// Statuses to answer, in order, per device token (200 once used up).
    scripts: Arc<Mutex<HashMap<String, Vec<u16>>>>,
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    fn start(dir: &std::path::Path, secret: &[u8]) -> Relay {
        let (cfg, ca_pem) = super::push_web::local_tls(dir, "relay", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, got) = std::sync::mpsc::channel();
        let scripts: Arc<Mutex<HashMap<String, Vec<u16>>>> = Arc::default();
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, counted) = (scripts.clone(), connections.clone());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (cfg, tx, s, key) = (cfg.clone(), tx.clone(), s.clone(), key.clone());
                std::thread::spawn(move || serve(tcp, cfg, &tx, &s, &key));
            }
        });
        Relay {
            port,
            ca_pem,
            got,
            scripts,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/relay/push", self.port)
    }

    fn script(&self, token: &str, statuses: &[u16]) {
        self.scripts
            .lock()
            .unwrap()
            .insert(token.to_owned(), statuses.to_vec());
    }

    /// Every request received within `window`.
    fn collect(&self, window: Duration) -> Vec<Relayed> {
        let deadline = now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(now()) {
            match self.got.recv_timeout(left) {
                Ok(p) => out.push(p),
                Err(_) => break,
            }
        }
        out
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What a relay checks before it trusts a request: the timestamp is fresh and the signature
/// is the shared secret's over "<timestamp>." and the body (compared in constant time).
fn verify(
    key: &ring::hmac::Key,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> Result<(), (u16, &'static str)> {
    let ts = headers
        .get("starling-timestamp")
        .and_then(|t| t.parse::<u64>().ok())
        .ok_or((400, "no timestamp"))?;
    if (unix_ms() / 1000).abs_diff(ts) > TIMESTAMP_SKEW_S {
        return Err((400, "stale timestamp"));
    }
    let sig = headers
        .get("starling-signature")
        .and_then(|s| s.strip_prefix("v1="))
        .and_then(unhex)
        .ok_or((401, "no v1 signature"))?;
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(body);
    ring::hmac::verify(key, &signed, &sig).map_err(|_| (401, "bad signature"))
}

/// Serves one connection's requests (keep-alive) until the client closes it.
fn serve(
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    tx: &Sender<Relayed>,
    scripts: &Mutex<HashMap<String, Vec<u16>>>,
    key: &ring::hmac::Key,
) {
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let (head, body) = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(raw[..i].to_vec()).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if raw.len() >= i + 4 + len {
                    let body = raw[i + 4..i + 4 + len].to_vec();
                    raw.drain(..i + 4 + len);
                    break (head, body);
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        };
        let mut lines = head.lines();
        let request_line = lines.next().unwrap().to_owned();
        let path = request_line.split(' ').nth(1).unwrap().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let (status, answer) = match verify(key, &headers, &body) {
            Err((status, why)) => (status, why),
            Ok(()) if !request_line.starts_with("POST ") => (405, "POST only"),
            Ok(()) => {
                let token = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["token"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let status = match scripts.lock().unwrap().get_mut(&token) {
                    Some(v) if !v.is_empty() => v.remove(0),
                    _ => 200,
                };
                (status, "")
            }
        };
        let extra = if status == 503 {
            "Retry-After: 0\r\n"
        } else {
            ""
        };
        let _ = write!(
            s,
            "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        let _ = s.flush();
        let _ = tx.send(Relayed {
            path,
            headers,
            body,
            status,
        });
    }
}

fn register_token(c: &mut Client, platform: v1::PushPlatform, token: &str, sandbox: bool) {
    let r = call(
        c,
        Body::RegisterPushToken(v1::RegisterPushToken {
            platform: platform as i32,
            token: token.into(),
            app_id: "org.example.chat".into(),
            sandbox,
        }),
    );
    assert!(matches!(r, Body::Done(_)), "{r:?}");
}

/// A browser's subscription (its endpoint is never contacted: the relay serves Web Push).
fn subscription() -> String {
    let rng = ring::rand::SystemRandom::new();
    let key =
        ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng).unwrap();
    let public = key.compute_public_key().unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    serde_json::json!({
        "endpoint": "https://push.example.net/sub/dee",
        "keys": { "p256dh": b64(public.as_ref()), "auth": b64(&[9u8; 16]) },
    })
    .to_string()
}

const SECRET: &[u8] = b"4f1c0e6b2a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";

/// The config: the relay's URL and CA, a secret file holding `secret` (with a final newline,
/// as `openssl rand -hex 32 >` writes it).
fn webhook_toml(dir: &std::path::Path, relay: &Relay, secret: &[u8], extra: &str) -> String {
    let secret_file = dir.join("webhook.secret");
    let mut line = secret.to_vec();
    line.push(b'\n');
    std::fs::write(&secret_file, line).unwrap();
    format!(
        "[push]\nca_file = \"{}\"\nretry_base_ms = 100\nretry_max_ms = 500\ngrace_ms = 300\n\
         [push.webhook]\nurl = \"{}\"\nsecret_file = \"{}\"\n{extra}",
        relay.ca_pem.display(),
        relay.url(),
        secret_file.display()
    )
}

#[test]
fn offline_devices_get_one_signed_content_free_webhook_per_interval() {
    let keys = tempfile::tempdir().unwrap();
    let relay = Relay::start(keys.path(), SECRET);
    let srv = Server::start("auto", &webhook_toml(keys.path(), &relay, SECRET, ""));
    assert!(
        srv.startup
            .iter()
            .any(|l| l.contains("push notifier: webhook (apns, fcm, web_push)")),
        "{:?}",
        srv.startup
    );
    let (mut ana, _) = user(&srv, "ana");
    let apns_token = "ab".repeat(32);
    let web_sub = subscription();
    let mut ids = Vec::new();
    for (name, platform, token, sandbox) in [
        ("ben", v1::PushPlatform::Fcm, "ben:APA91b-token", false),
        ("cy", v1::PushPlatform::Apns, apns_token.as_str(), true),
        ("dee", v1::PushPlatform::WebPush, web_sub.as_str(), false),
    ] {
        let (mut c, g) = user(&srv, name);
        register_token(&mut c, platform, token, sandbox);
        // Offline from here on.
        drop(c);
        ids.push(g);
    }
    relay.script(&apns_token, &[503]);
    // The subscription is in its stored form already (the three fields), which is what the
    // relay gets.
    relay.script(&web_sub, &[410]);
    let mut conv = 0;
    for i in 0..5 {
        conv = send(&mut ana, 10 + i, ids[0].user_id, "secret words").conversation_id;
    }
    send(&mut ana, 20, ids[1].user_id, "secret words");
    send(&mut ana, 30, ids[2].user_id, "secret words");
    let got = relay.collect(Duration::from_secs(4));
    for r in &got {
        assert_eq!(r.path, "/relay/push");
        assert_ne!(r.status, 401, "the signature verifies: {r:?}");
        assert_ne!(r.status, 400, "the timestamp is fresh: {r:?}");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(
            !r.body.windows(6).any(|w| w == b"secret"),
            "content-free: {r:?}"
        );
        let id = &r.headers["starling-notification-id"];
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
    }
    let to = |platform: &str| {
        got.iter()
            .filter(|r| r.json()["platform"] == platform)
            .collect::<Vec<_>>()
    };
    let ben = to("fcm");
    assert_eq!(ben.len(), 1, "one request for the burst: {got:?}");
    let body = ben[0].json();
    let collapse_key = body["collapse_key"].as_str().unwrap().to_owned();
    assert_eq!(collapse_key.len(), 22);
    assert_eq!(
        body,
        serde_json::json!({
            "v": 1,
            "platform": "fcm",
            "token": "ben:APA91b-token",
            "app_id": "org.example.chat",
            "sandbox": false,
            "conversation_id": conv.to_string(),
            "seq": 5,
            "unread_count": 5,
            "collapse_key": collapse_key,
        })
    );
    // 503 then 200: the same notification, a new timestamp and signature for each attempt.
    let cy = to("apns");
    assert_eq!(
        cy.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 200],
        "{got:?}"
    );
    assert_eq!(
        cy[0].headers["starling-notification-id"], cy[1].headers["starling-notification-id"],
        "a retry keeps its id"
    );
    assert_ne!(
        cy[0].headers["starling-notification-id"],
        ben[0].headers["starling-notification-id"]
    );
    let c = cy[1].json();
    assert_eq!(
        (
            c["token"].as_str(),
            c["sandbox"].as_bool(),
            c["app_id"].as_str()
        ),
        (
            Some(apns_token.as_str()),
            Some(true),
            Some("org.example.chat")
        )
    );
    assert_eq!(
        (c["seq"].as_u64(), c["unread_count"].as_u64()),
        (Some(1), Some(1))
    );
    // 410: asked once, then the token is gone.
    let dee = to("web_push");
    assert_eq!(dee.len(), 1, "{got:?}");
    assert_eq!(dee[0].json()["token"], web_sub.as_str());
    assert_eq!(dee[0].status, 410);
    // Kept-alive connections: fewer than requests (one per device notified at once at most).
    let opened = relay.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&opened) && opened < got.len() as u64,
        "{opened} connections for {} requests",
        got.len()
    );
    // Within the collapse interval: nothing more for Ben.
    send(&mut ana, 15, ids[0].user_id, "more secret words");
    assert!(
        relay.collect(Duration::from_secs(1)).is_empty(),
        "one per collapse interval"
    );
    assert_eq!(metric(&srv, "starling_push_sent_total"), 2);
    assert_eq!(metric(&srv, "starling_push_retries_total"), 1);
    assert_eq!(
        metric(&srv, "starling_push_invalid_tokens_removed_total"),
        1
    );
    let (meta, _dir) = meta_after_kill(srv);
    assert!(!has_push_token(&meta, &ids[2]), "a 410 removes the token");
    assert!(has_push_token(&meta, &ids[1]));
}

/// The relay holds another secret: it answers 401, which is a dead letter (not retried). A
/// Web Push token, a platform the webhook is not configured for, gets nothing.
#[test]
fn a_refused_signature_is_a_dead_letter_and_unserved_platforms_get_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let relay = Relay::start(keys.path(), SECRET);
    let wrong = b"another-secret-of-at-least-32-bytes!";
    let toml = webhook_toml(keys.path(), &relay, wrong, "platforms = [\"fcm\"]\n");
    let srv = Server::start("auto", &toml);
    let (mut ana, _) = user(&srv, "ana");
    let (mut ben, gb) = user(&srv, "ben");
    register_token(&mut ben, v1::PushPlatform::Fcm, "ben:APA91b-token", false);
    drop(ben);
    let (mut cy, gc) = user(&srv, "cy");
    register_token(&mut cy, v1::PushPlatform::WebPush, &subscription(), false);
    drop(cy);
    send(&mut ana, 1, gb.user_id, "hello");
    send(&mut ana, 2, gc.user_id, "hello");
    let got = relay.collect(Duration::from_secs(3));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].status, got[0].json()["platform"].as_str()),
        (401, Some("fcm"))
    );
    assert_eq!(metric(&srv, "starling_push_dead_letters"), 1);
    assert_eq!(metric(&srv, "starling_push_retries_total"), 0);
    assert_eq!(metric(&srv, "starling_push_sent_total"), 0);
    let Server { mut child, dir, .. } = srv;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let meta = EmbeddedMeta::open(&dir.path().join("data/meta.redb")).unwrap();
    assert_eq!(meta.dead_letters_count().unwrap(), 1);
    assert!(
        meta.push_token(UserId(gb.user_id), DeviceId(gb.device_id))
            .unwrap()
            .is_some(),
        "a refusal is not an invalid token"
    );
}

/// A bad `[push.webhook]` value, a secret file missing or shorter than 32 bytes, or a
/// platform also served by a built-in provider stops the start, naming the setting.
#[test]
fn bad_webhook_settings_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), SECRET);
    let cfg = dir.path().join("bad.toml");
    let short = dir.path().join("short.secret");
    std::fs::write(&short, format!("{}\n", "k".repeat(31))).unwrap();
    let good = dir.path().join("good.secret");
    std::fs::write(&good, SECRET).unwrap();
    let webhook = |url: &str, secret: &std::path::Path, extra: &str| {
        format!(
            "[push]\nca_file = \"{}\"\n[push.webhook]\nurl = \"{url}\"\nsecret_file = \"{}\"\n{extra}",
            relay.ca_pem.display(),
            secret.display()
        )
    };
    let url = relay.url();
    for (toml, code, names) in [
        (
            webhook("http://127.0.0.1:1/relay", &good, ""),
            2,
            "push.webhook.url",
        ),
        (
            webhook(&url, &good, "platforms = [\"gcm\"]\n"),
            2,
            "push.webhook.platforms",
        ),
        (
            webhook(
                &url,
                &good,
                "[push.fcm]\nservice_account_file = \"/nonexistent.json\"\n",
            ),
            2,
            "push.webhook.platforms",
        ),
        (webhook(&url, &short, ""), 1, "push.webhook.secret_file"),
        (
            webhook(&url, &dir.path().join("missing.secret"), ""),
            1,
            "push.webhook.secret_file",
        ),
    ] {
        std::fs::write(&cfg, &toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{toml}: {err}");
        assert!(err.contains(names), "{toml}: {err}");
    }
}
