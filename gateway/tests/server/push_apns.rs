//! Issue 36 §1: APNs notifications through the real binary, against a local APNs: HTTP/2 over
//! TLS (ALPN h2, hyper's server) with a certificate of its own CA, on two ports (production and
//! sandbox). It verifies the provider token's ES256 signature with the configured `.p8` key's
//! public half and checks every header; an offline device gets one content-free alert for a
//! burst, a 503 is retried, a 410 removes the token, and the requests share one connection
//! per endpoint.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use base64::Engine as _;
use ring::signature::KeyPair as _;

use super::messaging::call;
use super::push_web::{has_push_token, meta_after_kill, metric, send, unb64, user};
use super::*;

/// One request the local APNs received.
#[derive(Debug, Clone)]
struct Pushed {
    sandbox: bool,
    path: String,
    version: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

type Scripts = Arc<Mutex<HashMap<String, Vec<(u16, &'static str)>>>>;

/// A local APNs: answers each request with the next (status, reason) of its device token's
/// script, 200 once it is used up.
struct Apns {
    ports: [u16; 2],
    ca_pem: PathBuf,
    got: Receiver<Pushed>,
    scripts: Scripts,
    connections: Arc<AtomicU64>,
}

impl Apns {
    fn start(dir: &std::path::Path) -> Apns {
        let (cfg, ca_pem) = super::push_web::local_tls(dir, "apns", &[b"h2"]);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let (tx, got) = std::sync::mpsc::channel();
        let scripts: Scripts = Arc::default();
        let connections = Arc::new(AtomicU64::new(0));
        let mut ports = [0; 2];
        for (i, sandbox) in [false, true].into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            ports[i] = listener.local_addr().unwrap().port();
            let (acceptor, tx, scripts, connections) = (
                acceptor.clone(),
                tx.clone(),
                scripts.clone(),
                connections.clone(),
            );
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(serve(listener, acceptor, sandbox, tx, scripts, connections));
            });
        }
        Apns {
            ports,
            ca_pem,
            got,
            scripts,
            connections,
        }
    }

    fn script(&self, token: &str, answers: &[(u16, &'static str)]) {
        self.scripts
            .lock()
            .unwrap()
            .insert(token.to_owned(), answers.to_vec());
    }

    fn collect(&self, window: Duration) -> Vec<Pushed> {
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

async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sandbox: bool,
    tx: Sender<Pushed>,
    scripts: Scripts,
    connections: Arc<AtomicU64>,
) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, tx, scripts) = (acceptor.clone(), tx.clone(), scripts.clone());
        connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (tx, scripts) = (tx.clone(), scripts.clone());
                    async move {
                        let version = format!("{:?}", req.version());
                        let path = req.uri().path().to_owned();
                        let headers: HashMap<String, String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                            .collect();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        let token = path.trim_start_matches("/3/device/").to_owned();
                        let (status, reason) = {
                            let mut sc = scripts.lock().unwrap();
                            match sc.get_mut(&token) {
                                Some(v) if !v.is_empty() => v.remove(0),
                                _ => (200, ""),
                            }
                        };
                        let _ = tx.send(Pushed {
                            sandbox,
                            path,
                            version,
                            headers,
                            body,
                        });
                        let mut resp = hyper::Response::builder()
                            .status(status)
                            .header("apns-id", "00000000-0000-0000-0000-000000000001");
                        if status == 503 {
                            resp = resp.header("retry-after", "0");
                        }
                        let body = if reason.is_empty() {
                            String::new()
                        } else {
                            format!(r#"{{"reason":"{reason}"}}"#)
                        };
                        Ok::<_, std::convert::Infallible>(
                            resp.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// A `.p8` key (P-256, PKCS#8 PEM) in `dir`; its public half.
fn p8(dir: &std::path::Path) -> (PathBuf, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let path = dir.join("AuthKey_KEY1234567.p8");
    std::fs::write(&path, pem).unwrap();
    (path, pair.public_key().as_ref().to_vec())
}

fn register_apns(c: &mut Client, token: &str, sandbox: bool) {
    let r = call(
        c,
        Body::RegisterPushToken(v1::RegisterPushToken {
            platform: v1::PushPlatform::Apns as i32,
            token: token.into(),
            app_id: "org.example.chat".into(),
            sandbox,
        }),
    );
    assert!(matches!(r, Body::Done(_)), "{r:?}");
}

/// Checks a request as APNs does; returns its payload.
fn check(p: &Pushed, public: &[u8]) -> serde_json::Value {
    assert_eq!(p.version, "HTTP/2.0");
    let jwt = p.headers["authorization"]
        .strip_prefix("bearer ")
        .expect("a bearer provider token");
    let (input, sig) = jwt.rsplit_once('.').unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public)
        .verify(input.as_bytes(), &unb64(sig))
        .expect("the provider token is signed with the configured key");
    let (h, c) = input.split_once('.').unwrap();
    let h: serde_json::Value = serde_json::from_slice(&unb64(h)).unwrap();
    assert_eq!(h, serde_json::json!({"alg": "ES256", "kid": "KEY1234567"}));
    let c: serde_json::Value = serde_json::from_slice(&unb64(c)).unwrap();
    assert_eq!(c["iss"], "TEAM123456");
    let iat = c["iat"].as_u64().unwrap();
    let now_s = unix_ms() / 1000;
    assert!(iat <= now_s && iat + 60 > now_s, "{c}");
    assert_eq!(p.headers["apns-topic"], "org.example.chat");
    assert_eq!(p.headers["apns-push-type"], "alert");
    assert_eq!(p.headers["apns-priority"], "10");
    let exp: u64 = p.headers["apns-expiration"].parse().unwrap();
    assert!(exp > now_s + 86_000 && exp <= now_s + 86_400, "{exp}");
    assert_eq!(p.headers["apns-collapse-id"].len(), 22);
    assert!(!p.body.windows(6).any(|w| w == b"secret"), "content-free");
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    assert_eq!(v["aps"]["mutable-content"], 1);
    assert_eq!(
        v["aps"]["alert"],
        serde_json::json!({"loc-key": "STARLING_NEW_MESSAGES"})
    );
    assert_eq!(
        v["aps"]["thread-id"],
        p.headers["apns-collapse-id"].as_str()
    );
    v
}

#[test]
fn offline_devices_get_one_content_free_apns_alert_per_interval() {
    let keys = tempfile::tempdir().unwrap();
    let apns = Apns::start(keys.path());
    let (key_file, public) = p8(keys.path());
    let toml = format!(
        "[push]\nca_file = \"{}\"\nretry_base_ms = 100\nretry_max_ms = 500\ngrace_ms = 300\n\
         [push.apns]\nteam_id = \"TEAM123456\"\nkey_id = \"KEY1234567\"\nkey_file = \"{}\"\n\
         endpoint = \"https://127.0.0.1:{}\"\nsandbox_endpoint = \"https://127.0.0.1:{}\"\n",
        apns.ca_pem.display(),
        key_file.display(),
        apns.ports[0],
        apns.ports[1],
    );
    let srv = Server::start("auto", &toml);
    let (mut ana, _) = user(&srv, "ana");
    let tok = |b: u8| hex::encode([b; 32]);
    let mut ids = Vec::new();
    for (i, name) in ["ben", "cy", "dee", "eve"].into_iter().enumerate() {
        let (mut c, g) = user(&srv, name);
        register_apns(&mut c, &tok(0xa0 + i as u8).to_uppercase(), name == "eve");
        drop(c);
        ids.push(g);
    }
    apns.script(&tok(0xa1), &[(503, "ServiceUnavailable")]);
    apns.script(&tok(0xa2), &[(410, "Unregistered")]);
    let mut conv = 0;
    for i in 0..5 {
        conv = send(&mut ana, 10 + i, ids[0].user_id, "secret words").conversation_id;
    }
    send(&mut ana, 20, ids[1].user_id, "secret words");
    send(&mut ana, 30, ids[2].user_id, "secret words");
    send(&mut ana, 40, ids[3].user_id, "secret words");
    let got = apns.collect(Duration::from_secs(4));
    let to = |b: u8| {
        got.iter()
            .filter(|p| p.path == format!("/3/device/{}", tok(b)))
            .collect::<Vec<_>>()
    };
    let ben = to(0xa0);
    assert_eq!(ben.len(), 1, "one alert for the burst: {got:?}");
    assert!(!ben[0].sandbox);
    let v = check(ben[0], &public);
    assert_eq!(
        (
            v["conversation_id"].as_str(),
            v["seq"].as_u64(),
            v["unread_count"].as_u64()
        ),
        (Some(conv.to_string().as_str()), Some(5), Some(5))
    );
    assert_eq!(to(0xa1).len(), 2, "503 then 200: {got:?}");
    assert_eq!(to(0xa2).len(), 1, "410: asked once: {got:?}");
    let eve = to(0xa3);
    assert_eq!(eve.len(), 1, "{got:?}");
    assert!(
        eve[0].sandbox,
        "a sandbox token goes to the sandbox endpoint"
    );
    for p in &got {
        check(p, &public);
    }
    // The provider token is reused, and so is the connection of each endpoint.
    let jwts: std::collections::HashSet<_> =
        got.iter().map(|p| &p.headers["authorization"]).collect();
    assert_eq!(jwts.len(), 1, "one provider token");
    assert_eq!(
        apns.connections.load(Ordering::SeqCst),
        2,
        "one connection per endpoint for {} requests",
        got.len()
    );
    send(&mut ana, 15, ids[0].user_id, "more secret words");
    assert!(
        apns.collect(Duration::from_secs(1)).is_empty(),
        "one per collapse interval"
    );
    assert_eq!(metric(&srv, "starling_push_sent_total"), 3);
    assert_eq!(metric(&srv, "starling_push_retries_total"), 1);
    assert_eq!(
        metric(&srv, "starling_push_invalid_tokens_removed_total"),
        1
    );
    let (meta, _dir) = meta_after_kill(srv);
    assert!(!has_push_token(&meta, &ids[2]), "410 removes the token");
    assert!(has_push_token(&meta, &ids[0]));
}

/// A bad `[push.apns]` value or key file stops the start with a message naming the setting.
#[test]
fn bad_apns_settings_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let bad_key = dir.path().join("not-a-key.p8");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let ca = Apns::start(dir.path()).ca_pem;
    let apns = |team: &str, endpoint: &str, key: &std::path::Path| {
        format!(
            "[push]\nca_file = \"{}\"\n[push.apns]\nteam_id = \"{team}\"\nkey_id = \"K1\"\n\
             key_file = \"{}\"\nendpoint = \"{endpoint}\"\n",
            ca.display(),
            key.display()
        )
    };
    for (toml, code, names) in [
        (
            apns("", "https://127.0.0.1:1", &bad_key),
            2,
            "push.apns.team_id",
        ),
        (
            apns("T1", "http://127.0.0.1:1", &bad_key),
            2,
            "push.apns.endpoint",
        ),
        (
            apns("T1", "https://127.0.0.1:1", &bad_key),
            1,
            "push.apns.key_file",
        ),
        (
            apns("T1", "https://127.0.0.1:1", &dir.path().join("missing.p8")),
            1,
            "push.apns.key_file",
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
