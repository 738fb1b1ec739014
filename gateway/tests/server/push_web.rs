//! Issue 36 §1/§6: Web Push notifications through the real binary, to a local push service
//! over HTTPS that checks the request as a browser vendor's would: the VAPID token's ES256
//! signature against the configured key, its audience and expiry, the headers, and the
//! aes128gcm payload, which it decrypts with the subscription's private key (RFC 8291). An
//! offline device gets exactly one notification per collapse interval, carrying no message
//! text; a 503 is retried; a 410 removes the token; a SIGKILL with a notification queued, then
//! a restart: it is sent.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender};

use base64::Engine as _;
use ring::signature::KeyPair as _;
use starling_storage::AccountStore as _;
use starling_storage::{DeviceId, EmbeddedMeta, UserId};

use super::messaging::{call, text};
use super::*;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

pub(super) fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// One request the push service received.
#[derive(Debug, Clone)]
pub(super) struct Pushed {
    pub(super) path: String,
    pub(super) headers: HashMap<String, String>,
    pub(super) body: Vec<u8>,
}

/// A browser's subscription: its P-256 key pair (static, so that every notification can be
/// decrypted) and auth secret.
struct UserAgent {
    key: aws_lc_rs::agreement::PrivateKey,
    public: Vec<u8>,
    auth: [u8; 16],
}

impl UserAgent {
    fn new(auth: u8) -> Self {
        let key =
            aws_lc_rs::agreement::PrivateKey::generate(&aws_lc_rs::agreement::ECDH_P256).unwrap();
        let public = key.compute_public_key().unwrap().as_ref().to_vec();
        UserAgent {
            key,
            public,
            auth: [auth; 16],
        }
    }

    fn subscription(&self, endpoint: &str) -> String {
        serde_json::json!({
            "endpoint": endpoint,
            "expirationTime": null,
            "keys": { "p256dh": b64(&self.public), "auth": b64(&self.auth) },
        })
        .to_string()
    }

    /// Decrypts an aes128gcm body (RFC 8291 §3.4, RFC 8188 §2).
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().unwrap());
        assert_eq!(rs, 4096);
        let idlen = body[20] as usize;
        assert_eq!(idlen, 65, "keyid is the sender's P-256 key");
        let as_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        let peer = aws_lc_rs::agreement::UnparsedPublicKey::new(
            &aws_lc_rs::agreement::ECDH_P256,
            as_public,
        );
        let ecdh = aws_lc_rs::agreement::agree(&self.key, peer, (), |s| Ok(s.to_vec())).unwrap();
        let expand = |salt: &[u8], ikm: &[u8], info: &[&[u8]], out: &mut [u8]| {
            struct Len(usize);
            impl ring::hkdf::KeyType for Len {
                fn len(&self) -> usize {
                    self.0
                }
            }
            ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt)
                .extract(ikm)
                .expand(info, Len(out.len()))
                .unwrap()
                .fill(out)
                .unwrap();
        };
        let mut ikm = [0u8; 32];
        expand(
            &self.auth,
            &ecdh,
            &[b"WebPush: info\0", &self.public, as_public],
            &mut ikm,
        );
        let (mut cek, mut nonce) = ([0u8; 16], [0u8; 12]);
        expand(salt, &ikm, &[b"Content-Encoding: aes128gcm\0"], &mut cek);
        expand(salt, &ikm, &[b"Content-Encoding: nonce\0"], &mut nonce);
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &cek).unwrap(),
        );
        let mut buf = ciphertext.to_vec();
        let plain = key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::empty(),
                &mut buf,
            )
            .expect("the payload decrypts with the subscription's keys");
        assert_eq!(plain.last(), Some(&2), "one last record, delimiter 0x02");
        plain[..plain.len() - 1].to_vec()
    }
}

/// A local push service: HTTPS with a certificate of its own CA; answers each request with
/// the next status of its script (201 once the script is used up), scripts being per path, or
/// per registration token for FCM sends. `/token` answers an OAuth2 access token (FCM).
pub(super) struct PushService {
    pub(super) port: u16,
    pub(super) ca_pem: PathBuf,
    got: Receiver<Pushed>,
    scripts: Arc<Mutex<HashMap<String, Vec<u16>>>>,
    /// TLS connections accepted.
    pub(super) connections: Arc<std::sync::atomic::AtomicU64>,
}

/// A TLS server configuration for a local push service: a certificate for 127.0.0.1 signed by a
/// CA of its own, whose PEM is written to `dir/<name>-ca.pem` (for `push.ca_file`); the server
/// offers `alpn`.
pub(super) fn local_tls(
    dir: &std::path::Path,
    name: &str,
    alpn: &[&[u8]],
) -> (Arc<rustls::ServerConfig>, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_pem = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (Arc::new(cfg), ca_pem)
}

impl PushService {
    pub(super) fn start(dir: &std::path::Path) -> PushService {
        let (cfg, ca_pem) = local_tls(dir, "push", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, got) = std::sync::mpsc::channel();
        let scripts: Arc<Mutex<HashMap<String, Vec<u16>>>> = Arc::default();
        let s = scripts.clone();
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (cfg, tx, s) = (cfg.clone(), tx.clone(), s.clone());
                std::thread::spawn(move || serve(tcp, cfg, &tx, &s));
            }
        });
        PushService {
            port,
            ca_pem,
            got,
            scripts,
            connections,
        }
    }

    pub(super) fn endpoint(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub(super) fn script(&self, path: &str, statuses: &[u16]) {
        self.scripts
            .lock()
            .unwrap()
            .insert(path.to_owned(), statuses.to_vec());
    }

    /// Every request received within `window`.
    pub(super) fn collect(&self, window: Duration) -> Vec<Pushed> {
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

/// Serves the requests of one connection (keep-alive) until the client closes it.
fn serve(
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    tx: &Sender<Pushed>,
    scripts: &Mutex<HashMap<String, Vec<u16>>>,
) {
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut raw = Vec::new();
    while serve_one(&mut s, &mut raw, tx, scripts) {}
}

/// One request; whether the connection stays open.
fn serve_one(
    s: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    raw: &mut Vec<u8>,
    tx: &Sender<Pushed>,
    scripts: &Mutex<HashMap<String, Vec<u16>>>,
) -> bool {
    let mut buf = [0u8; 4096];
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
        let Ok(n) = s.read(&mut buf) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap().to_owned();
    let path = request_line.split(' ').nth(1).unwrap().to_owned();
    assert!(request_line.starts_with("POST "), "{request_line}");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let script = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"]["token"].as_str().map(str::to_owned))
        .unwrap_or_else(|| path.clone());
    let status = {
        let mut sc = scripts.lock().unwrap();
        match sc.get_mut(&script) {
            Some(v) if !v.is_empty() => v.remove(0),
            _ if path == "/token" => 200,
            _ => 201,
        }
    };
    let extra = if status == 503 {
        "Retry-After: 0\r\n"
    } else {
        ""
    };
    let answer = match status {
        200 if path == "/token" => {
            r#"{"access_token":"at-1","expires_in":3600,"token_type":"Bearer"}"#
        }
        404 => {
            r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#
        }
        _ => "",
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
    let _ = s.flush();
    let _ = tx.send(Pushed {
        path,
        headers,
        body,
    });
    true
}

/// The VAPID key the server signs with, and the config naming it and the push service's CA.
struct Vapid {
    public: Vec<u8>,
    toml: String,
}

fn vapid(dir: &std::path::Path, ca: &std::path::Path, extra: &str) -> Vapid {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let key_path = dir.join("vapid.pem");
    std::fs::write(&key_path, pem).unwrap();
    Vapid {
        public: pair.public_key().as_ref().to_vec(),
        toml: format!(
            "[push]\nca_file = \"{}\"\nretry_base_ms = 100\nretry_max_ms = 500\n{extra}\
             [push.web_push]\nvapid_private_key_file = \"{}\"\nvapid_subject = \"mailto:ops@example.org\"\n\
             dangerous_allow_private_endpoints = true\n",
            ca.display(),
            key_path.display()
        ),
    }
}

/// Checks a request as a push service does; returns the decrypted payload.
fn check(p: &Pushed, vapid: &Vapid, port: u16, ua: &UserAgent) -> serde_json::Value {
    let auth = &p.headers["authorization"];
    let rest = auth.strip_prefix("vapid t=").expect(auth);
    let (jwt, k) = rest.split_once(", k=").expect(auth);
    assert_eq!(unb64(k), vapid.public, "k is the configured key");
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        &vapid.public,
    )
    .verify(input.as_bytes(), &unb64(sig))
    .expect("the VAPID token is signed with the configured key");
    let (h, c) = input.split_once('.').unwrap();
    let h: serde_json::Value = serde_json::from_slice(&unb64(h)).unwrap();
    assert_eq!(h["alg"], "ES256");
    let c: serde_json::Value = serde_json::from_slice(&unb64(c)).unwrap();
    assert_eq!(c["aud"], format!("https://127.0.0.1:{port}"));
    assert_eq!(c["sub"], "mailto:ops@example.org");
    let exp = c["exp"].as_u64().unwrap();
    let now_s = unix_ms() / 1000;
    assert!(exp > now_s && exp <= now_s + 24 * 3600, "{c}");
    assert_eq!(p.headers["content-encoding"], "aes128gcm");
    assert_eq!(p.headers["ttl"], "86400");
    assert_eq!(p.headers["topic"].len(), 22);
    let plain = ua.decrypt(&p.body);
    serde_json::from_slice(&plain).unwrap()
}

fn register_web_push(c: &mut Client, sub: &str) {
    let r = call(
        c,
        Body::RegisterPushToken(v1::RegisterPushToken {
            platform: v1::PushPlatform::WebPush as i32,
            token: sub.into(),
            ..Default::default()
        }),
    );
    assert!(matches!(r, Body::Done(_)), "{r:?}");
}

pub(super) fn send(a: &mut Client, cmid: u8, to: u64, words: &str) -> v1::SendAck {
    match call(a, text(cmid, to, words)) {
        Body::SendAck(ack) => ack,
        other => panic!("{other:?}"),
    }
}

pub(super) fn user(srv: &Server, name: &str) -> (Client, v1::SessionGranted) {
    let mut c = srv.hello("");
    let ident = format!("{name}@example.org");
    let g = register(srv, &mut c, email(&ident), &ident);
    (c, g)
}

/// Stops `srv` with SIGKILL and opens its metadata, to look at what it stored (the directory
/// goes when the returned guard does).
pub(super) fn meta_after_kill(srv: Server) -> (EmbeddedMeta, tempfile::TempDir) {
    let Server { mut child, dir, .. } = srv;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let meta = EmbeddedMeta::open(&dir.path().join("data/meta.redb")).unwrap();
    (meta, dir)
}

/// Whether the device of `who` has a push token stored.
pub(super) fn has_push_token(meta: &EmbeddedMeta, who: &v1::SessionGranted) -> bool {
    meta.push_token(UserId(who.user_id), DeviceId(who.device_id))
        .unwrap()
        .is_some()
}

pub(super) fn metric(srv: &Server, name: &str) -> u64 {
    let m = srv.metrics();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn offline_devices_get_one_content_free_web_push_per_interval_retried_or_dropped() {
    let keys = tempfile::tempdir().unwrap();
    let service = PushService::start(keys.path());
    let v = vapid(
        keys.path(),
        &service.ca_pem,
        "grace_ms = 300\ncollapse_ms = 60000\n",
    );
    let srv = Server::start("auto", &v.toml);
    assert!(
        srv.startup.iter().any(|l| l.contains("push notifier")),
        "{:?}",
        srv.startup
    );
    let (mut ana, _) = user(&srv, "ana");
    let (ben_ua, cy_ua, dee_ua) = (UserAgent::new(1), UserAgent::new(2), UserAgent::new(3));
    let mut ids = Vec::new();
    for (name, ua, path) in [
        ("ben", &ben_ua, "/sub/ben"),
        ("cy", &cy_ua, "/sub/cy"),
        ("dee", &dee_ua, "/sub/dee"),
    ] {
        let (mut c, g) = user(&srv, name);
        register_web_push(&mut c, &ua.subscription(&service.endpoint(path)));
        // Offline from here on.
        drop(c);
        ids.push(g);
    }
    service.script("/sub/cy", &[503]);
    service.script("/sub/dee", &[410]);
    // A burst of five to Ben: one notification, naming the last seq.
    let mut conv = 0;
    for i in 0..5 {
        conv = send(&mut ana, 10 + i, ids[0].user_id, "secret words").conversation_id;
    }
    send(&mut ana, 20, ids[1].user_id, "secret words");
    send(&mut ana, 30, ids[2].user_id, "secret words");
    let got = service.collect(Duration::from_secs(4));
    let on = |path: &str| got.iter().filter(|p| p.path == path).collect::<Vec<_>>();
    let ben = on("/sub/ben");
    assert_eq!(ben.len(), 1, "one notification for the burst: {got:?}");
    for p in &got {
        assert!(
            !p.body.windows(6).any(|w| w == b"secret"),
            "the body is encrypted and content-free"
        );
    }
    let payload = check(ben[0], &v, service.port, &ben_ua);
    assert_eq!(
        payload,
        serde_json::json!({
            "v": 1,
            "conversation_id": conv.to_string(),
            "seq": 5,
            "unread_count": 5,
        })
    );
    assert!(!payload.to_string().contains("secret"));
    // 503 then 201: retried, and the retry decrypts too.
    let cy = on("/sub/cy");
    assert_eq!(cy.len(), 2, "{got:?}");
    assert_eq!(check(cy[1], &v, service.port, &cy_ua)["seq"], 1);
    // 410: asked once, then the token is gone.
    assert_eq!(on("/sub/dee").len(), 1, "{got:?}");
    // The three devices are notified at once, by parallel senders, each on a connection of
    // its own; the retry reuses a kept one.
    let opened = service
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&opened) && opened < got.len() as u64,
        "kept-alive connections: {opened} for {} requests",
        got.len()
    );
    // Within the collapse interval: nothing more for Ben.
    send(&mut ana, 15, ids[0].user_id, "more secret words");
    assert!(
        service.collect(Duration::from_secs(1)).is_empty(),
        "one per collapse interval"
    );
    assert_eq!(metric(&srv, "starling_push_sent_total"), 2);
    assert_eq!(metric(&srv, "starling_push_retries_total"), 1);
    assert_eq!(
        metric(&srv, "starling_push_invalid_tokens_removed_total"),
        1
    );
    assert!(metric(&srv, "starling_push_collapsed_total") >= 5);
    let (meta, _dir) = meta_after_kill(srv);
    assert!(!has_push_token(&meta, &ids[2]), "a 410 removes the token");
    assert!(has_push_token(&meta, &ids[0]));
}

#[test]
fn a_notification_queued_at_a_sigkill_is_sent_after_the_restart() {
    let keys = tempfile::tempdir().unwrap();
    let service = PushService::start(keys.path());
    let v = vapid(
        keys.path(),
        &service.ca_pem,
        "grace_ms = 1500\ncollapse_ms = 60000\n",
    );
    let srv = Server::start("auto", &v.toml);
    let (mut ana, _) = user(&srv, "ana");
    let ua = UserAgent::new(4);
    let (mut ben, gb) = user(&srv, "ben");
    register_web_push(&mut ben, &ua.subscription(&service.endpoint("/sub/ben")));
    drop(ben);
    for i in 0..3 {
        send(&mut ana, 40 + i, gb.user_id, "hello");
    }
    // In the outbox, not yet due.
    std::thread::sleep(Duration::from_millis(300));
    assert!(service.collect(Duration::from_millis(1)).is_empty());
    let srv = srv.kill9_and_restart("auto");
    let got = service.collect(Duration::from_secs(4));
    assert_eq!(got.len(), 1, "sent once after the restart: {got:?}");
    assert_eq!(check(&got[0], &v, service.port, &ua)["seq"], 3);
    drop(srv);
}

/// A bad `[push]` value, or a VAPID key file that is not a P-256 PKCS#8 key, stops the start
/// with a message naming the setting.
#[test]
fn bad_push_settings_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let bad_key = dir.path().join("not-a-key.pem");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "").unwrap();
    let good_ca = PushService::start(dir.path()).ca_pem;
    for (toml, code, names) in [
        ("[push]\ngrace_ms = 0\n", 2, "push.grace_ms"),
        (
            "[push.web_push]\nvapid_private_key_file = \"x\"\nvapid_subject = \"ops\"\n",
            2,
            "push.web_push.vapid_subject",
        ),
        (
            &format!(
                "[push]\nca_file = \"{}\"\n[push.web_push]\nvapid_private_key_file = \"{}\"\n\
                 vapid_subject = \"mailto:o@x.org\"\n",
                ca.display(),
                bad_key.display()
            ),
            1,
            "push.ca_file",
        ),
        (
            &format!(
                "[push]\nca_file = \"{}\"\n[push.web_push]\nvapid_private_key_file = \"{}\"\n\
                 vapid_subject = \"mailto:o@x.org\"\n",
                good_ca.display(),
                bad_key.display()
            ),
            1,
            "push.web_push.vapid_private_key_file",
        ),
    ] {
        std::fs::write(&cfg, toml).unwrap();
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

/// A subscription whose endpoint is on a loopback (or private) address is never sent to
/// unless the operator allows it: its token is removed instead.
#[test]
fn a_subscription_on_a_private_address_is_never_sent_to() {
    let keys = tempfile::tempdir().unwrap();
    let service = PushService::start(keys.path());
    let mut v = vapid(keys.path(), &service.ca_pem, "grace_ms = 200\n");
    v.toml = v.toml.replace(
        "dangerous_allow_private_endpoints = true",
        "dangerous_allow_private_endpoints = false",
    );
    let srv = Server::start("auto", &v.toml);
    let (mut ana, _) = user(&srv, "ana");
    let (mut ben, gb) = user(&srv, "ben");
    let ua = UserAgent::new(5);
    register_web_push(&mut ben, &ua.subscription(&service.endpoint("/sub/ben")));
    drop(ben);
    send(&mut ana, 1, gb.user_id, "hello");
    assert!(service.collect(Duration::from_secs(2)).is_empty());
    assert_eq!(
        metric(&srv, "starling_push_invalid_tokens_removed_total"),
        1
    );
    assert_eq!(metric(&srv, "starling_push_sent_total"), 0);
}
