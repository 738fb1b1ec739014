//! Tests against the real `starling` binary: each test starts it with a
//! temporary data dir and ephemeral ports, for both the io_uring and the
//! epoll driver, and talks to it over TLS with a rustls client.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use starling_protocol::v1::{self, ErrorCode, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder};

const DRIVERS: [&str; 2] = ["io-uring", "epoll"];

#[allow(
    clippy::disallowed_methods,
    reason = "tests measure deadlines against the wall clock"
)]
fn now() -> Instant {
    Instant::now()
}

#[allow(
    clippy::disallowed_methods,
    reason = "tests compare token expiry with the wall clock"
)]
fn unix_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(d.as_millis()).unwrap()
}

struct Server {
    child: KillOnDrop,
    dir: tempfile::TempDir,
    tls_addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// The media endpoint, if `[media] listen` was set.
    media_addr: Option<SocketAddr>,
    /// The dev CA certificate (PEM) the server generated.
    ca: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    /// What it printed on stdout before `ready`.
    startup: Vec<String>,
}

impl Server {
    fn start(driver: &str, extra_toml: &str) -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), driver, extra_toml)
    }

    /// Kills the server with SIGKILL (no shutdown, no flush) and starts a
    /// new one on the same data directory.
    fn kill9_and_restart(self, driver: &str) -> Server {
        let Server { mut child, dir, .. } = self;
        child.0.kill().unwrap(); // SIGKILL on Unix
        child.0.wait().unwrap();
        let toml = std::fs::read_to_string(dir.path().join("starling.toml")).unwrap();
        Server::start_in(dir, driver, &toml)
    }

    fn start_in(dir: tempfile::TempDir, driver: &str, extra_toml: &str) -> Server {
        let cfg = dir.path().join("starling.toml");
        std::fs::write(&cfg, extra_toml).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--shards", "2", "--driver", driver])
            .env("STARLING_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Killed on drop, even if start-up checks below panic.
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut tls_addr, mut metrics_addr, mut ca, mut media_addr) = (None, None, None, None);
        let mut startup = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("server did not become ready");
            startup.push(line.clone());
            if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
                tls_addr = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("metrics: http://") {
                metrics_addr = Some(a.trim_end_matches("/metrics").parse().unwrap());
            } else if let Some(a) = line.strip_prefix("media (HTTPS): ") {
                media_addr = Some(a.split(' ').next().unwrap().parse().unwrap());
            } else if let Some(p) = line.trim().strip_prefix("CA certificate:") {
                ca = Some(PathBuf::from(p.trim()));
            } else if line.starts_with("shards: ") && driver != "auto" {
                assert!(line.contains(driver), "{line}");
            } else if line == "ready" {
                break;
            }
        }
        let ca = ca.unwrap();
        let tls = client_tls(&ca);
        Server {
            child,
            dir,
            tls_addr: tls_addr.unwrap(),
            metrics_addr: metrics_addr.unwrap(),
            media_addr,
            ca,
            tls,
            startup,
        }
    }

    fn connect(&self) -> Client {
        let tcp = TcpStream::connect(self.tls_addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client::over(tcp, &self.tls)
    }

    /// A connection that has said Hello (optionally with a token).
    fn hello(&self, token: &str) -> Client {
        let mut c = self.connect();
        let w = c.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: token.into(),
            ..Default::default()
        }));
        assert!(matches!(w, Body::Welcome(_)), "{w:?}");
        c
    }

    fn otp_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/otp.log")).unwrap_or_default()
    }

    fn code_for(&self, ident: &str) -> String {
        let log = self.otp_log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{ident} ")))
            .expect("no code in otp.log");
        line.rsplit(' ').next().unwrap().to_owned()
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.child.0.id() as i32;
        // Safety: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.0.try_wait().unwrap() {
                return st;
            }
            assert!(now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A TLS 1.3 client configuration trusting the server's dev CA.
fn client_tls(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(tls)
}

/// A TCP connection to `dst` from `source` (any loopback address; port
/// chosen by the kernel), with an optional small receive buffer (set before
/// connecting, so the advertised window honours it).
fn tcp_connect(
    dst: SocketAddr,
    source: Option<std::net::IpAddr>,
    rcvbuf: Option<usize>,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n)?;
    }
    if let Some(ip) = source {
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(30))?;
    let tcp = TcpStream::from(s);
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(tcp)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Client {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    dec: FrameDecoder,
    next_id: u64,
}

impl Client {
    /// TLS over an established TCP connection (the handshake runs on the
    /// first read or write).
    fn over(tcp: TcpStream, tls: &Arc<rustls::ClientConfig>) -> Client {
        let name = "localhost".try_into().unwrap();
        let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
        Client {
            s: rustls::StreamOwned::new(conn, tcp),
            dec: FrameDecoder::new(1 << 20),
            next_id: 1,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
        self.s.flush().unwrap();
    }

    fn send(&mut self, request_id: u64, body: Body) {
        self.try_send(request_id, body).unwrap();
    }

    fn try_send(&mut self, request_id: u64, body: Body) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        FrameEncoder::new(1 << 20)
            .encode(
                &v1::Frame {
                    request_id,
                    body: Some(body),
                },
                &mut b,
            )
            .unwrap();
        self.s.write_all(&b)?;
        self.s.flush()
    }

    /// The next frame, or None at end of stream / reset.
    fn recv(&mut self) -> Option<v1::Frame> {
        loop {
            if let Some(f) = self.dec.poll_frame().unwrap() {
                return Some(f);
            }
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.dec.handle_bytes(&buf[..n]),
            }
        }
    }

    fn request(&mut self, body: Body) -> Body {
        let id = self.next_id;
        self.next_id += 1;
        self.send(id, body);
        let f = self.recv().expect("connection closed");
        assert_eq!(f.request_id, id, "{f:?}");
        f.body.unwrap()
    }

    fn expect_closed(&mut self) {
        if let Some(f) = self.recv() {
            panic!("expected close, got {f:?}");
        }
    }
}

fn err_code(b: &Body) -> ErrorCode {
    match b {
        Body::Error(e) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected Error, got {other:?}"),
    }
}

/// The code of `Welcome.auth_error` in the answer to a Hello whose token was refused (the
/// connection is welcomed, not authenticated).
fn auth_error(b: &Body) -> ErrorCode {
    match b {
        Body::Welcome(v1::Welcome {
            authenticated: None,
            auth_error: Some(e),
            ..
        }) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected Welcome with auth_error, got {other:?}"),
    }
}

fn email(e: &str) -> Option<v1::Identifier> {
    Some(v1::Identifier {
        kind: Some(v1::identifier::Kind::Email(e.into())),
    })
}

fn phone(p: &str) -> Option<v1::Identifier> {
    Some(v1::Identifier {
        kind: Some(v1::identifier::Kind::Phone(p.into())),
    })
}

fn register(
    srv: &Server,
    c: &mut Client,
    ident: Option<v1::Identifier>,
    key: &str,
) -> v1::SessionGranted {
    let sent = c.request(Body::RequestOtp(v1::RequestOtp {
        identifier: ident.clone(),
    }));
    assert!(matches!(sent, Body::OtpSent(_)), "{sent:?}");
    let code = srv.code_for(key);
    let g = c.request(Body::VerifyOtp(v1::VerifyOtp {
        identifier: ident,
        code,
        device: Some(v1::DeviceInfo {
            name: "test phone".into(),
            platform: "linux".into(),
        }),
        display_name: "Ana".into(),
    }));
    match g {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    }
}

#[test]
fn hello_ping_metrics_and_sigterm() {
    for driver in DRIVERS {
        let mut srv = Server::start(driver, "");
        let mut c = srv.connect();
        let w = c.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            ..Default::default()
        }));
        let Body::Welcome(w) = w else { panic!("{w:?}") };
        assert_eq!(w.protocol_version, 1);
        assert_eq!(w.limits.unwrap().frame_bytes_max, 65536);
        assert!(w.authenticated.is_none());
        assert!(matches!(
            c.request(Body::Ping(v1::Ping { nonce: 9 })),
            Body::Pong(v1::Pong { nonce: 9 })
        ));
        // Not built yet / not authenticated: an Error, and the connection stays.
        let e = c.request(Body::Send(v1::Send::default()));
        assert_eq!(err_code(&e), ErrorCode::Unauthenticated);
        let m = srv.metrics();
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("starling_connections{shard="), "{m}");
        assert!(m.contains("starling_frames_in_total{shard="), "{m}");
        // SIGTERM: Goodbye{SHUTTING_DOWN}, close, exit 0.
        let pid = srv.child.0.id() as i32;
        // Safety: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let f = c.recv().expect("goodbye");
        match f.body.unwrap() {
            Body::Goodbye(g) => assert_eq!(g.code, ErrorCode::ShuttingDown as i32),
            other => panic!("{other:?}"),
        }
        c.expect_closed();
        let st = srv.sigterm();
        assert!(st.success(), "{driver}: {st:?}");
    }
}

#[test]
fn accounts_over_the_protocol() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "[accounts]\nargon2_memory_kib = 1024\n");
        let mut a = srv.hello("");
        // Unauthenticated requests are refused, not disconnected.
        assert_eq!(
            err_code(&a.request(Body::GetMe(v1::GetMe {}))),
            ErrorCode::Unauthenticated
        );
        let g = register(&srv, &mut a, phone("+14155550100"), "+14155550100");
        assert!(g.new_user);
        assert!(!g.access_token.is_empty() && !g.refresh_token.is_empty());
        let Body::Profile(p) = a.request(Body::GetMe(v1::GetMe {})) else {
            panic!()
        };
        assert_eq!(
            (p.user_id, p.display_name.as_str(), p.phone.as_str()),
            (g.user_id, "Ana", "+14155550100")
        );
        let Body::Profile(p) = a.request(Body::UpdateProfile(v1::UpdateProfile {
            about: Some("hi".into()),
            ..Default::default()
        })) else {
            panic!()
        };
        assert_eq!(p.about, "hi");
        assert!(matches!(
            a.request(Body::SetPassword(v1::SetPassword {
                new_password: "correct horse".into()
            })),
            Body::Done(_)
        ));
        // Features this server does not offer answer NOT_SUPPORTED and keep the connection
        // (media needs `[media] listen`, which this server does not set).
        let e = a.request(Body::RequestUpload(v1::RequestUpload::default()));
        assert_eq!(err_code(&e), ErrorCode::NotSupported);

        // Password login from a second device.
        let mut b = srv.hello("");
        let bad = b.request(Body::Login(v1::Login {
            identifier: phone("+14155550100"),
            credential: Some(v1::login::Credential::Password("wrong password".into())),
            device: None,
        }));
        assert_eq!(err_code(&bad), ErrorCode::InvalidCredentials);
        let Body::SessionGranted(g2) = b.request(Body::Login(v1::Login {
            identifier: phone("+14155550100"),
            credential: Some(v1::login::Credential::Password("correct horse".into())),
            device: Some(v1::DeviceInfo {
                name: "laptop".into(),
                platform: "linux".into(),
            }),
        })) else {
            panic!()
        };
        assert_eq!(g2.user_id, g.user_id);
        assert_ne!(g2.device_id, g.device_id);
        let Body::DeviceList(d) = b.request(Body::ListDevices(v1::ListDevices {})) else {
            panic!()
        };
        assert_eq!(d.devices.len(), 2);
        assert!(
            d.devices
                .iter()
                .any(|d| d.current && d.device_id == g2.device_id)
        );

        // Contact discovery by SHA-256 of E.164, from another user.
        let mut c = srv.hello("");
        register(&srv, &mut c, email("bob@example.org"), "bob@example.org");
        let h = ring::digest::digest(&ring::digest::SHA256, b"+14155550100");
        let other = ring::digest::digest(&ring::digest::SHA256, b"+14155550199");
        let Body::ContactMatches(m) = c.request(Body::DiscoverContacts(v1::DiscoverContacts {
            phone_sha256: vec![h.as_ref().to_vec().into(), other.as_ref().to_vec().into()],
        })) else {
            panic!()
        };
        assert_eq!(m.matches.len(), 1);
        assert_eq!(m.matches[0].user_id, g.user_id);

        // Tokens: valid, forged, garbage.
        let w = srv.connect().request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: g.access_token.clone(),
            ..Default::default()
        }));
        let Body::Welcome(w) = w else { panic!("{w:?}") };
        assert_eq!(w.authenticated.unwrap().session_id, g.session_id);
        let mut parts: Vec<String> = g.access_token.split('.').map(str::to_owned).collect();
        parts[1] = g2.access_token.split('.').nth(1).unwrap().to_owned();
        let forged = parts.join(".");
        for bad in [
            forged.as_str(),
            "not.a.token",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.",
        ] {
            let mut x = srv.connect();
            let e = x.request(Body::Hello(v1::Hello {
                protocol_version: 1,
                access_token: bad.into(),
                ..Default::default()
            }));
            assert_eq!(auth_error(&e), ErrorCode::TokenInvalid);
            // Welcomed all the same: a second Hello is refused, Authenticate works.
            assert_eq!(
                err_code(&x.request(Body::Hello(v1::Hello {
                    protocol_version: 1,
                    ..Default::default()
                }))),
                ErrorCode::UnexpectedFrame
            );
            assert_eq!(
                err_code(&x.request(Body::Authenticate(v1::Authenticate {
                    access_token: bad.into()
                }))),
                ErrorCode::TokenInvalid
            );
        }

        // Refresh rotates; reusing the old refresh token revokes the session
        // and closes its live connections.
        let mut live = srv.hello(&g2.access_token);
        let Body::SessionGranted(g3) = b.request(Body::Refresh(v1::Refresh {
            refresh_token: g2.refresh_token.clone(),
        })) else {
            panic!()
        };
        assert_ne!(g3.refresh_token, g2.refresh_token);
        assert_eq!(g3.session_id, g2.session_id);
        let mut thief = srv.hello("");
        let e = thief.request(Body::Refresh(v1::Refresh {
            refresh_token: g2.refresh_token.clone(),
        }));
        assert_eq!(err_code(&e), ErrorCode::RefreshTokenReused);
        let f = live.recv().expect("goodbye");
        assert!(
            matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::SessionRevoked as i32),
            "{f:?}"
        );
        live.expect_closed();
        let e = srv.connect().request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: g3.access_token.clone(),
            ..Default::default()
        }));
        assert_eq!(auth_error(&e), ErrorCode::SessionRevoked);

        // Logout closes the session's connections and invalidates its token.
        let mut other_conn = srv.hello(&g.access_token);
        assert!(matches!(
            a.request(Body::Logout(v1::Logout { session_id: 0 })),
            Body::Done(_)
        ));
        for conn in [&mut a, &mut other_conn] {
            let f = conn.recv().expect("goodbye");
            assert!(
                matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::SessionRevoked as i32),
                "{f:?}"
            );
            conn.expect_closed();
        }
        let mut x = srv.connect();
        let e = x.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: g.access_token.clone(),
            ..Default::default()
        }));
        assert_eq!(auth_error(&e), ErrorCode::SessionRevoked);
        let m = srv.metrics();
        assert!(
            m.contains("starling_auth_failures_total{reason=\"refresh_token_reused\"} 1"),
            "{m}"
        );
    }
}

#[test]
fn expired_tokens_and_otp_guessing() {
    let srv = Server::start("auto", "[accounts]\naccess_token_ttl_ms = 1000\n");
    let mut a = srv.hello("");
    let g = register(&srv, &mut a, email("eve@example.org"), "eve@example.org");
    std::thread::sleep(Duration::from_millis(2100));
    let e = srv.connect().request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: g.access_token,
        ..Default::default()
    }));
    assert_eq!(auth_error(&e), ErrorCode::TokenExpired);

    // Guessing: 5 wrong codes burn the code; then even the right one fails.
    let mut c = srv.hello("");
    let id = email("mallory@example.org");
    assert!(matches!(
        c.request(Body::RequestOtp(v1::RequestOtp {
            identifier: id.clone()
        })),
        Body::OtpSent(_)
    ));
    let code = srv.code_for("mallory@example.org");
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(err_code(&c.request(Body::VerifyOtp(v1::VerifyOtp {
            identifier: id.clone(),
            code: wrong.into(),
            ..Default::default()
        }))));
    }
    assert_eq!(&codes[..4], &[ErrorCode::OtpInvalid; 4]);
    assert_eq!(codes[4], ErrorCode::OtpAttemptsExceeded);
    let e = c.request(Body::VerifyOtp(v1::VerifyOtp {
        identifier: id.clone(),
        code,
        ..Default::default()
    }));
    assert_eq!(err_code(&e), ErrorCode::OtpAttemptsExceeded);
    // And a new code cannot be requested at once.
    let e = c.request(Body::RequestOtp(v1::RequestOtp { identifier: id }));
    assert_eq!(err_code(&e), ErrorCode::RateLimited);
}

/// A live connection is closed when the access token that authenticated it
/// expires: Goodbye{TOKEN_EXPIRED}, then close; the client refreshes and
/// reconnects. The same token, cached by the shard, is refused afterwards.
#[test]
fn expired_access_token_closes_live_connections() {
    for driver in DRIVERS {
        let srv = Server::start(
            driver,
            "[accounts]\naccess_token_ttl_ms = 2000\n[limits]\ntimer_tick_ms = 20\n",
        );
        let mut a = srv.hello("");
        let g = register(&srv, &mut a, email("tess@example.org"), "tess@example.org");
        // Authenticated by Hello{token} (twice: the second is a cache hit),
        // by Authenticate, and by VerifyOtp (`a`).
        let mut b = srv.hello(&g.access_token);
        let mut c = srv.hello(&g.access_token);
        let mut d = srv.hello("");
        assert!(matches!(
            d.request(Body::Authenticate(v1::Authenticate {
                access_token: g.access_token.clone()
            })),
            Body::Done(_)
        ));
        assert!(matches!(
            b.request(Body::Ping(v1::Ping { nonce: 7 })),
            Body::Pong(_)
        ));
        let left_ms = g.access_expires_at_ms.saturating_sub(unix_ms());
        let t0 = now();
        for conn in [&mut a, &mut b, &mut c, &mut d] {
            let f = conn.recv().expect("goodbye");
            assert!(
                matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::TokenExpired as i32),
                "{driver}: {f:?}"
            );
            conn.expect_closed();
        }
        let waited = t0.elapsed();
        // Closed at the expiry (token expiry has 1 s resolution), not later.
        assert!(
            waited <= Duration::from_millis(left_ms + 1500),
            "{driver}: closed {waited:?} after a token with {left_ms} ms left"
        );
        let e = srv.connect().request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: g.access_token.clone(),
            ..Default::default()
        }));
        assert_eq!(auth_error(&e), ErrorCode::TokenExpired, "{driver}");
        // Refresh and reconnect.
        let mut r = srv.hello("");
        let Body::SessionGranted(g2) = r.request(Body::Refresh(v1::Refresh {
            refresh_token: g.refresh_token.clone(),
        })) else {
            panic!("{driver}: refresh failed")
        };
        let mut again = srv.hello(&g2.access_token);
        assert!(matches!(
            again.request(Body::Ping(v1::Ping { nonce: 8 })),
            Body::Pong(_)
        ));
        let m = srv.metrics();
        assert!(m.contains("starling_token_expiries_total"), "{m}");
    }
}

#[test]
fn bad_frames_close_only_their_connection() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let mut healthy = srv.hello("");

        // Oversized: a prefix announcing 1 MiB.
        let mut c = srv.hello("");
        c.send_raw(&[0x80, 0x80, 0x40]);
        let f = c.recv().unwrap();
        assert_eq!(err_code(&f.body.unwrap()), ErrorCode::FrameTooLarge);
        c.expect_closed();

        // Malformed protobuf.
        let mut c = srv.hello("");
        c.send_raw(&[4, 0x08, 0x05, 0x52, 0x7f]);
        let f = c.recv().unwrap();
        assert_eq!(f.request_id, 5);
        assert_eq!(err_code(&f.body.unwrap()), ErrorCode::MalformedFrame);
        c.expect_closed();

        // Truncated: half a frame, then end of stream.
        let mut c = srv.hello("");
        c.send_raw(&[10, 0x08, 0x01]);
        c.s.conn.send_close_notify();
        c.s.flush().unwrap();
        c.s.sock.shutdown(Shutdown::Write).unwrap();
        let f = c.recv().unwrap();
        assert_eq!(err_code(&f.body.unwrap()), ErrorCode::BadLengthPrefix);
        c.expect_closed();

        // Unknown frame type: Error, and the connection stays open.
        let mut c = srv.hello("");
        c.send_raw(&[5, 0x08, 0x09, 0xb8, 0x3e, 0x01]);
        let f = c.recv().unwrap();
        assert_eq!(f.request_id, 9);
        assert_eq!(err_code(&f.body.unwrap()), ErrorCode::UnknownFrameType);
        assert!(matches!(
            c.request(Body::Ping(v1::Ping { nonce: 1 })),
            Body::Pong(_)
        ));

        // Not Hello first: Error and close.
        let mut c = srv.connect();
        let e = c.request(Body::Ping(v1::Ping { nonce: 1 }));
        assert_eq!(err_code(&e), ErrorCode::UnexpectedFrame);
        c.expect_closed();

        assert!(matches!(
            healthy.request(Body::Ping(v1::Ping { nonce: 2 })),
            Body::Pong(_)
        ));
        let m = srv.metrics();
        assert!(m.contains("starling_protocol_errors_total"), "{m}");
    }
}

#[test]
fn deadlines_cut_silent_and_slow_connections() {
    let toml = "[limits]\ntimer_tick_ms = 20\nhandshake_timeout_ms = 400\nhello_timeout_ms = 400\nheartbeat_ms = 300\nidle_timeout_ms = 600\n";
    for driver in DRIVERS {
        let srv = Server::start(driver, toml);
        // Silent TCP: never starts TLS.
        let t0 = now();
        let mut raw = TcpStream::connect(srv.tls_addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(raw.read(&mut buf), Ok(0) | Err(_)));
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "{took:?}"
        );

        // Slowloris over TLS: one byte of a Hello every 100 ms.
        let mut c = srv.connect();
        let mut hello = BytesMut::new();
        FrameEncoder::default()
            .encode(
                &v1::Frame {
                    request_id: 1,
                    body: Some(Body::Hello(v1::Hello {
                        protocol_version: 1,
                        client: Some(v1::ClientInfo {
                            app: "slow".repeat(20),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })),
                },
                &mut hello,
            )
            .unwrap();
        let t0 = now();
        let mut cut = false;
        for b in hello.iter() {
            if c.s.write_all(&[*b]).and_then(|()| c.s.flush()).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if t0.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if !cut {
            let f = c.recv();
            if let Some(f) = f {
                assert_eq!(err_code(&f.body.unwrap()), ErrorCode::DeadlineExceeded);
            }
            c.expect_closed();
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

        // Idle after Welcome: Goodbye{HEARTBEAT_TIMEOUT}; pinging keeps it open.
        let mut idle = srv.hello("");
        let mut pinger = srv.hello("");
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(150));
            assert!(matches!(
                pinger.request(Body::Ping(v1::Ping { nonce: 3 })),
                Body::Pong(_)
            ));
        }
        let f = idle.recv().expect("goodbye");
        assert!(
            matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::HeartbeatTimeout as i32),
            "{f:?}"
        );
        idle.expect_closed();
        let m = srv.metrics();
        assert!(!m.contains("starling_heartbeat_timeouts_total{shard=\"0\"} 0\nstarling_heartbeat_timeouts_total{shard=\"1\"} 0"), "{m}");
    }
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nframe_bytes_max = 10\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.frame_bytes_max"), "{err}");
    std::fs::write(&cfg, "listen = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config file"));
}

/// The webhook OTP sender POSTs JSON; OTP login and RemoveDevice work and
/// removing a device closes its connections.
#[test]
fn webhook_otp_login_and_remove_device() {
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/otp", hook.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for s in hook.incoming() {
            let mut s = s.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            // Read head and body (Content-Length) without a full HTTP parser.
            loop {
                let n = s.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
        }
    });
    let toml = format!(
        "[accounts]\notp_resend_ms = 0\n[accounts.otp_sender]\nkind = \"webhook\"\nurl = \"{url}\"\n"
    );
    let srv = Server::start("epoll", &toml);
    let ident = phone("+491701234567");
    let code_from_hook = |c: &mut Client| {
        assert!(matches!(
            c.request(Body::RequestOtp(v1::RequestOtp {
                identifier: ident.clone()
            })),
            Body::OtpSent(_)
        ));
        let req = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(req.starts_with("POST /otp HTTP/1.1\r\n"), "{req}");
        let body = req.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["identifier"], "+491701234567");
        v["code"].as_str().unwrap().to_owned()
    };
    let mut a = srv.hello("");
    let code = code_from_hook(&mut a);
    assert!(
        srv.otp_log().is_empty(),
        "webhook mode must not write otp.log"
    );
    let Body::SessionGranted(g1) = a.request(Body::VerifyOtp(v1::VerifyOtp {
        identifier: ident.clone(),
        code,
        ..Default::default()
    })) else {
        panic!()
    };
    assert!(g1.new_user);

    // A second device signs in with a fresh code (Login by OTP).
    let mut b = srv.hello("");
    let code = code_from_hook(&mut b);
    let Body::SessionGranted(g2) = b.request(Body::Login(v1::Login {
        identifier: ident.clone(),
        credential: Some(v1::login::Credential::OtpCode(code)),
        device: Some(v1::DeviceInfo {
            name: "tablet".into(),
            platform: "android".into(),
        }),
    })) else {
        panic!()
    };
    assert_eq!(g2.user_id, g1.user_id);
    assert!(!g2.new_user);
    let Body::DeviceList(d) = a.request(Body::ListDevices(v1::ListDevices {})) else {
        panic!()
    };
    assert_eq!(d.devices.len(), 2);

    // Removing the second device closes its connections and kills its token.
    let mut victim = srv.hello(&g2.access_token);
    assert!(matches!(
        a.request(Body::RemoveDevice(v1::RemoveDevice {
            device_id: g2.device_id
        })),
        Body::Done(_)
    ));
    for conn in [&mut victim, &mut b] {
        let f = conn.recv().expect("goodbye");
        assert!(
            matches!(f.body, Some(Body::Goodbye(ref g)) if g.code == ErrorCode::SessionRevoked as i32),
            "{f:?}"
        );
        conn.expect_closed();
    }
    let e = srv.connect().request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: g2.access_token,
        ..Default::default()
    }));
    assert_eq!(auth_error(&e), ErrorCode::SessionRevoked);
    assert_eq!(
        err_code(&a.request(Body::RemoveDevice(v1::RemoveDevice { device_id: 99 }))),
        ErrorCode::NotFound
    );
}

/// The CPUs a thread may run on, as the kernel lists them (`Cpus_allowed_list`).
fn allowed_cpus(status: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

#[test]
fn storage_io_cpus_place_every_log_writer_and_metadata_writer() {
    // The first CPU this test may use: the server is told to put its storage threads there.
    let mine = std::fs::read_to_string("/proc/self/status").unwrap();
    let first: usize = allowed_cpus(&mine)
        .unwrap()
        .split([',', '-'])
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let srv = Server::start("auto", &format!("[storage]\nio_cpus = [{first}]\n"));
    let task_dir = format!("/proc/{}/task", srv.child.0.id());
    // (thread name, its allowed CPUs) for the storage threads; both kinds start before `ready`,
    // but give the metadata writers a moment in case they are still being placed.
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.clear();
        for t in std::fs::read_dir(&task_dir).unwrap().flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim().to_string();
            if comm == "starling-log-io" || comm == "starling-meta" {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                seen.push((comm, allowed_cpus(&status).unwrap_or_default()));
            }
        }
        let writers = seen.iter().filter(|(c, _)| c == "starling-meta").count();
        if writers == 2 && seen.iter().all(|(_, cpus)| *cpus == first.to_string()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.sort();
    let want: Vec<(String, String)> = [
        "starling-log-io",
        "starling-log-io",
        "starling-meta",
        "starling-meta",
    ]
    .iter()
    .map(|c| (c.to_string(), first.to_string()))
    .collect();
    assert_eq!(
        seen, want,
        "two shards: a log writer and a metadata writer each, all on CPU {first}"
    );
}

#[path = "server/accounts_abuse.rs"]
mod accounts_abuse;
#[path = "server/accounts_migration.rs"]
mod accounts_migration;
#[path = "server/blocks.rs"]
mod blocks;
#[path = "server/changes.rs"]
mod changes;
#[path = "server/connections.rs"]
mod connections;
#[path = "server/cursors.rs"]
mod cursors;
#[path = "server/disappearing.rs"]
mod disappearing;
#[path = "server/discovery.rs"]
mod discovery;
#[path = "server/faults.rs"]
mod faults;
#[path = "server/group_receipts.rs"]
mod group_receipts;
#[path = "server/groups.rs"]
mod groups;
#[path = "server/keys.rs"]
mod keys;
#[path = "server/last_seen.rs"]
mod last_seen;
#[path = "server/media.rs"]
mod media;
#[path = "server/messaging.rs"]
mod messaging;
#[path = "server/presence.rs"]
mod presence;
#[path = "server/push.rs"]
mod push;
#[path = "server/push_apns.rs"]
mod push_apns;
#[path = "server/push_fcm.rs"]
mod push_fcm;
#[path = "server/push_web.rs"]
mod push_web;
#[path = "server/push_webhook.rs"]
mod push_webhook;
#[path = "server/read_fanout.rs"]
mod read_fanout;
#[path = "server/router_config.rs"]
mod router_config;
#[path = "server/spec.rs"]
mod spec;
#[path = "server/titles.rs"]
mod titles;

#[allow(unused_imports)]
use connections::*;
#[allow(unused_imports)]
use messaging::*;
