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
    /// The dev CA certificate (PEM) the server generated.
    ca: PathBuf,
    tls: Arc<rustls::ClientConfig>,
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
        let (mut tls_addr, mut metrics_addr, mut ca) = (None, None, None);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("server did not become ready");
            if let Some(a) = line.strip_prefix("listening (TLS 1.3): ") {
                tls_addr = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("metrics: http://") {
                metrics_addr = Some(a.trim_end_matches("/metrics").parse().unwrap());
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
            ca,
            tls,
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
        // (messaging and groups are wired to the router now; media is not).
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

/// Server RSS in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Sum of a per-shard counter or gauge in the server's /metrics.
fn metric_sum(srv: &Server, name: &str) -> i64 {
    let prefix = format!("{name}{{");
    srv.metrics()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

fn open_connections(srv: &Server) -> i64 {
    metric_sum(srv, "starling_connections")
}

/// The hidden child entry of `ten_thousand_idle_connections_with_heartbeats`.
const IDLE_CHILD_TEST: &str = "idle_connections_child";

/// What a child process reports on stdout (`starling-child k=v ...`).
#[derive(Debug, Default, Clone, Copy)]
struct ChildStatus {
    /// Connections opened and authenticated.
    opened: usize,
    /// Connections that failed to open, or stopped answering pings.
    lost: usize,
    /// Complete ping rounds over all of its connections.
    passes: u64,
    /// At exit: connections whose close the server answered with end of stream.
    closed: Option<usize>,
    /// Its stdout ended (it exited).
    eof: bool,
}

impl ChildStatus {
    fn parse(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("starling-child ") else {
            return;
        };
        for kv in rest.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(v) = v.parse::<u64>() else { continue };
            match k {
                "opened" => self.opened = v as usize,
                "lost" => self.lost = v as usize,
                "passes" => self.passes = v,
                "closed" => self.closed = Some(v as usize),
                _ => {}
            }
        }
    }
}

/// The connection-holding child processes of the idle-connections test and
/// what they reported so far.
struct Children {
    procs: Vec<KillOnDrop>,
    stdin: Vec<Option<std::process::ChildStdin>>,
    shares: Vec<usize>,
    status: Vec<ChildStatus>,
    rx: std::sync::mpsc::Receiver<(usize, Option<String>)>,
    /// Exiting is expected (their stdin was closed).
    stopping: bool,
}

impl Children {
    /// Re-executes this test binary `shares.len()` times, running only the
    /// hidden child test; child `k` opens `shares[k]` connections.
    fn spawn(srv: &Server, token: &[String], shares: Vec<usize>, ping_ms: u64) -> Children {
        let exe = std::env::current_exe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut procs = Vec::new();
        let mut stdin = Vec::new();
        for (k, share) in shares.iter().enumerate() {
            let mut child = Command::new(&exe)
                .args([
                    IDLE_CHILD_TEST,
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("STARLING_CONN_CHILD", k.to_string())
                .env("STARLING_CHILD_ADDR", srv.tls_addr.to_string())
                .env("STARLING_CHILD_CA", &srv.ca)
                .env("STARLING_CHILD_TOKEN", &token[k % token.len()])
                .env("STARLING_CHILD_COUNT", share.to_string())
                .env("STARLING_CHILD_PING_MS", ping_ms.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            stdin.push(child.stdin.take());
            let out = child.stdout.take().unwrap();
            procs.push(KillOnDrop(child));
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((k, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((k, None));
            });
        }
        Children {
            procs,
            stdin,
            status: vec![ChildStatus::default(); shares.len()],
            shares,
            rx,
            stopping: false,
        }
    }

    /// Reads the children's reports until `done` holds; fails on a lost
    /// connection, an unexpected exit, or after `limit`.
    fn until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&Children) -> bool) {
        let deadline = now() + limit;
        loop {
            for (k, st) in self.status.iter().enumerate() {
                assert_eq!(st.lost, 0, "child {k} lost connections: {st:?}");
                if st.eof && !self.stopping {
                    let exit = self.procs[k].0.wait();
                    panic!("child {k} exited early ({exit:?}): {st:?}");
                }
            }
            if done(self) {
                return;
            }
            let left = deadline.saturating_duration_since(now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}: {:?}",
                self.status
            );
            match self.rx.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok((k, Some(line))) => self.status[k].parse(&line),
                Ok((k, None)) => self.status[k].eof = true,
                Err(_) => {}
            }
        }
    }

    fn opened(&self) -> usize {
        self.status.iter().map(|s| s.opened).sum()
    }

    /// Closes their stdin (they close their connections and exit), then
    /// checks that each exited successfully after a clean close of all its
    /// connections.
    fn stop(mut self) {
        self.stopping = true;
        for s in &mut self.stdin {
            drop(s.take());
        }
        self.until(
            "the children to close and exit",
            Duration::from_secs(120),
            |c| c.status.iter().all(|s| s.eof),
        );
        for (k, p) in self.procs.iter_mut().enumerate() {
            let deadline = now() + Duration::from_secs(30);
            let st = loop {
                if let Some(st) = p.0.try_wait().unwrap() {
                    break st;
                }
                assert!(now() < deadline, "child {k} did not exit");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(st.success(), "child {k}: {st:?}");
            assert_eq!(
                self.status[k].closed,
                Some(self.shares[k]),
                "child {k}: every connection closed cleanly"
            );
        }
    }
}

/// 10,000 authenticated idle TLS connections that only heartbeat, held by
/// child processes (this test binary re-executed; one process may hold at
/// most 20,000 files): the server's gauge reaches the total, heartbeats
/// keep every connection open past the idle timeout, nothing is closed,
/// the server's memory per connection is bounded, and every connection
/// closes cleanly when its process ends. The count can be changed with
/// STARLING_IDLE_CONNS (each child holds at most 5,000).
#[test]
fn ten_thousand_idle_connections_with_heartbeats() {
    let total: usize = std::env::var("STARLING_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // Children ping every second (also while still opening); a connection
    // silent for 8 s is closed, and the connections are held for longer
    // than that once all are open.
    let idle_ms = 8000;
    let toml = format!(
        "[limits]\ntimer_tick_ms = 100\nheartbeat_ms = 1000\nidle_timeout_ms = {idle_ms}\n"
    );
    let srv = Server::start("auto", &toml);
    let pid = srv.child.0.id();
    // One user per child; each child opens all its connections with its
    // user's token (a session may hold many connections).
    let procs = total.div_ceil(5000).max(2);
    let tokens: Vec<String> = (0..procs)
        .map(|k| {
            let who = format!("idle{k}@example.org");
            let mut c = srv.hello("");
            register(&srv, &mut c, email(&who), &who).access_token
        })
        .collect();
    // The registration connections were dropped above: wait until the
    // server has closed them.
    let deadline = now() + Duration::from_secs(30);
    while open_connections(&srv) != 0 {
        assert!(now() < deadline, "registration connections stay open");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_before = rss_kib(pid);
    let shares: Vec<usize> = (0..procs)
        .map(|k| total / procs + usize::from(k < total % procs))
        .collect();
    let t0 = now();
    let mut children = Children::spawn(&srv, &tokens, shares, 1000);

    children.until("all connections to open", Duration::from_secs(300), |c| {
        c.opened() == total
    });
    let opened = t0.elapsed();
    let deadline = now() + Duration::from_secs(60);
    while open_connections(&srv) != total as i64 {
        assert!(now() < deadline, "gauge: {}", srv.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_open = rss_kib(pid);

    // Hold past the idle timeout, then wait for one more complete ping
    // round of every child: each connection answered after it had been
    // open longer than the idle timeout.
    let hold = Duration::from_millis(idle_ms + 2000);
    let held_from = now();
    children.until("the hold", hold + Duration::from_secs(60), |_| {
        held_from.elapsed() >= hold
    });
    let passes: Vec<u64> = children.status.iter().map(|s| s.passes).collect();
    children.until(
        "a ping round after the hold",
        Duration::from_secs(120),
        |c| c.status.iter().zip(&passes).all(|(s, p)| s.passes > *p),
    );
    let held = open_connections(&srv);
    let rss_held = rss_kib(pid);
    let m = srv.metrics();
    assert_eq!(held, total as i64, "{m}");
    assert_eq!(
        metric_sum(&srv, "starling_heartbeat_timeouts_total"),
        0,
        "{m}"
    );

    children.stop();
    let deadline = now() + Duration::from_secs(60);
    while open_connections(&srv) != 0 {
        assert!(now() < deadline, "connections left open: {}", srv.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }

    let per_conn = (rss_open.saturating_sub(rss_before) * 1024) / total as u64;
    println!(
        "{total} idle TLS connections from {procs} processes opened in {opened:?}; server RSS {rss_before} KiB -> {rss_open} KiB open (~{per_conn} bytes per connection) -> {rss_held} KiB after holding {:?}",
        held_from.elapsed()
    );
    // Generous bounds: an idle connection costs a few KiB (TLS state, no
    // read buffer); holding them with heartbeats does not grow memory.
    assert!(per_conn < 48 * 1024, "{per_conn} bytes per idle connection");
    assert!(
        rss_held <= rss_open + rss_open / 4 + 16 * 1024,
        "RSS grew while holding: {rss_open} KiB -> {rss_held} KiB"
    );
}

/// Counters of one connection-holding thread of a child process.
#[derive(Default)]
struct HoldStats {
    opened: std::sync::atomic::AtomicUsize,
    lost: std::sync::atomic::AtomicUsize,
    passes: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicUsize,
}

/// What a child holds: where, as whom, how many, how often it pings.
struct HoldSpec {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    /// Source addresses (127.0.0.x) to spread connections over.
    sources: Vec<std::net::IpAddr>,
    ping: Duration,
    deadline: Instant,
}

/// A new connection from `source`, authenticated with Hello{token}.
fn open_authenticated(spec: &HoldSpec, source: std::net::IpAddr) -> Result<Client, String> {
    let tcp = tcp_connect(spec.addr, Some(source), None).map_err(|e| e.to_string())?;
    let mut c = Client::over(tcp, &spec.tls);
    c.try_send(
        1,
        Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: spec.token.clone(),
            ..Default::default()
        }),
    )
    .map_err(|e| e.to_string())?;
    match c.recv() {
        Some(v1::Frame {
            body: Some(Body::Welcome(w)),
            ..
        }) if w.authenticated.is_some() => Ok(c),
        other => Err(format!("no authenticated Welcome: {other:?}")),
    }
}

/// One thread of a child: opens `count` connections, pinging the open ones
/// every `spec.ping` (pipelined over the connections) until `stop`, then
/// closes them all (close_notify, FIN) and waits for the server's end of
/// stream on each.
fn hold_connections(
    spec: &HoldSpec,
    worker: usize,
    count: usize,
    st: &HoldStats,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut conns: Vec<Option<Client>> = Vec::with_capacity(count);
    let mut next_ping = now() + spec.ping;
    let mut nonce = 1u64;
    while !stop.load(Relaxed) && now() < spec.deadline {
        if now() >= next_ping {
            nonce += 1;
            for slot in &mut conns {
                if let Some(c) = slot
                    && c.try_send(nonce, Body::Ping(v1::Ping { nonce })).is_err()
                {
                    eprintln!("ping write failed");
                    *slot = None;
                    st.lost.fetch_add(1, Relaxed);
                }
            }
            for slot in &mut conns {
                if let Some(c) = slot {
                    match c.recv() {
                        Some(v1::Frame {
                            request_id,
                            body: Some(Body::Pong(_)),
                        }) if request_id == nonce => {}
                        other => {
                            eprintln!("no Pong: {other:?}");
                            *slot = None;
                            st.lost.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            if conns.len() == count {
                st.passes.fetch_add(1, Relaxed);
            }
            next_ping = now() + spec.ping;
        } else if conns.len() < count {
            let i = worker + 2 * conns.len();
            match open_authenticated(spec, spec.sources[i % spec.sources.len()]) {
                Ok(c) => {
                    conns.push(Some(c));
                    st.opened.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    eprintln!("opening connection {i}: {e}");
                    conns.push(None);
                    st.lost.fetch_add(1, Relaxed);
                }
            }
        } else {
            let left = next_ping.saturating_duration_since(now());
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
    for c in conns.iter_mut().flatten() {
        c.s.conn.send_close_notify();
        let _ = c.s.flush();
        let _ = c.s.sock.shutdown(Shutdown::Write);
    }
    for c in conns.iter_mut().flatten() {
        let mut buf = [0u8; 256];
        // The server answers end of stream by closing (it need not send
        // close_notify back); a frame, a timeout or a reset is not clean.
        let clean = match c.s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
        };
        if clean {
            st.closed.fetch_add(1, Relaxed);
        }
    }
}

/// Child side of `ten_thousand_idle_connections_with_heartbeats`: does
/// nothing unless STARLING_CONN_CHILD is set (the parent runs this binary
/// with `idle_connections_child --exact`). Opens STARLING_CHILD_COUNT
/// authenticated connections on two threads, holds them with pings,
/// reports `starling-child opened=N lost=N passes=N` lines, and when its
/// stdin closes (or after 10 minutes) closes them and reports `closed=N`.
#[test]
fn idle_connections_child() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let Ok(k) = std::env::var("STARLING_CONN_CHILD") else {
        return;
    };
    let k: u8 = k.parse().unwrap();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
    let count: usize = var("STARLING_CHILD_COUNT").parse().unwrap();
    // Four source addresses per child (127.0.0.2.. for child 0), so that
    // ephemeral ports never run short.
    let sources = (0..4)
        .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + 4 * k + i)))
        .collect();
    let spec = HoldSpec {
        addr: var("STARLING_CHILD_ADDR").parse().unwrap(),
        tls: client_tls(std::path::Path::new(&var("STARLING_CHILD_CA"))),
        token: var("STARLING_CHILD_TOKEN"),
        sources,
        ping: Duration::from_millis(var("STARLING_CHILD_PING_MS").parse().unwrap()),
        deadline: now() + Duration::from_secs(600),
    };
    let stop = AtomicBool::new(false);
    let stats = [HoldStats::default(), HoldStats::default()];
    std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            // The parent closes our stdin to end the test (or dies).
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Relaxed);
        });
        let workers: Vec<_> = stats
            .iter()
            .enumerate()
            .map(|(w, st)| {
                let n = count / 2 + usize::from(w < count % 2);
                let spec = &spec;
                s.spawn(move || hold_connections(spec, w, n, st, stop))
            })
            .collect();
        let mut last = String::new();
        loop {
            let finished = workers
                .iter()
                .all(std::thread::ScopedJoinHandle::is_finished);
            let sum = |f: &dyn Fn(&HoldStats) -> usize| stats.iter().map(f).sum::<usize>();
            let line = format!(
                "starling-child opened={} lost={} passes={}",
                sum(&|s| s.opened.load(Relaxed)),
                sum(&|s| s.lost.load(Relaxed)),
                stats
                    .iter()
                    .map(|s| s.passes.load(Relaxed))
                    .min()
                    .unwrap_or(0),
            );
            if line != last {
                println!("{line}");
                last = line;
            }
            if finished {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for w in workers {
            w.join().unwrap();
        }
        let closed: usize = stats.iter().map(|s| s.closed.load(Relaxed)).sum();
        println!("starling-child closed={closed}");
        // The stdin thread ends at EOF; exit without waiting for it if
        // we stopped on the deadline.
        if !stop.load(Relaxed) {
            std::process::exit(1);
        }
    });
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

/// Reads frames until one matches `pred`; returns it and what came before.
fn recv_until(
    c: &mut Client,
    mut pred: impl FnMut(&v1::Frame) -> bool,
) -> (v1::Frame, Vec<v1::Frame>) {
    let mut before = Vec::new();
    loop {
        let f = c.recv().expect("connection closed while waiting");
        if pred(&f) {
            return (f, before);
        }
        before.push(f);
    }
}

/// Sends a request and waits for its answer (pushes in between are skipped).
fn call(c: &mut Client, body: Body) -> Body {
    let id = c.next_id;
    c.next_id += 1;
    c.send(id, body);
    recv_until(c, |f| f.request_id == id).0.body.unwrap()
}

fn text(cmid: u8, to: u64, body: &str) -> Body {
    Body::Send(v1::Send {
        client_msg_id: vec![cmid; 16].into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    })
}

fn receipt(f: &v1::Frame) -> Option<&v1::Receipt> {
    match &f.body {
        Some(Body::Receipt(r)) => Some(r),
        _ => None,
    }
}

/// Ana and Ben, registered by email, each on a connection of their own.
fn ana_and_ben(srv: &Server) -> (Client, v1::SessionGranted, Client, v1::SessionGranted) {
    let mut a = srv.hello("");
    let ga = register(srv, &mut a, email("ana@example.org"), "ana@example.org");
    let mut b = srv.hello("");
    let gb = register(srv, &mut b, email("ben@example.org"), "ben@example.org");
    (a, ga, b, gb)
}

#[test]
fn messaging_end_to_end() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
        let (ua, ub) = (ga.user_id, gb.user_id);

        // A → B: acked with seq 1, pushed to B.
        let ack = match call(&mut a, text(1, ub, "hello ben")) {
            Body::SendAck(a) => a,
            other => panic!("{driver}: {other:?}"),
        };
        assert_eq!((ack.seq, ack.duplicate), (1, false), "{driver}");
        let conv = ack.conversation_id;
        assert_ne!(conv, 0);
        let (d, _) = recv_until(&mut b, |f| matches!(f.body, Some(Body::Deliver(_))));
        let Some(Body::Deliver(d)) = d.body else {
            unreachable!()
        };
        let m = d.message.unwrap();
        assert_eq!((m.conversation_id, m.seq, m.sender_user_id), (conv, 1, ua));
        assert_eq!(&m.body[..], b"hello ben");

        // B acknowledges delivery, then reads: A gets DELIVERED, then READ.
        let done = call(
            &mut b,
            Body::DeliveryAck(v1::DeliveryAck {
                conversation_id: conv,
                up_to_seq: 1,
            }),
        );
        assert!(matches!(done, Body::Done(_)), "{driver}: {done:?}");
        let (r, _) = recv_until(&mut a, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Delivered as i32)
        });
        let r = receipt(&r).unwrap();
        assert_eq!(
            (r.conversation_id, r.up_to_seq, r.by_user_id),
            (conv, 1, ub)
        );
        let done = call(
            &mut b,
            Body::ReadCursor(v1::ReadCursor {
                conversation_id: conv,
                up_to_seq: 1,
            }),
        );
        assert!(matches!(done, Body::Done(_)), "{driver}: {done:?}");
        let (r, _) = recv_until(&mut a, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Read as i32)
        });
        let r = receipt(&r).unwrap();
        assert_eq!(
            (r.conversation_id, r.up_to_seq, r.by_user_id),
            (conv, 1, ub)
        );

        // B goes offline; A sends two more and retries the first.
        drop(b);
        for (i, body) in [(2u8, "one"), (3, "two")] {
            match call(&mut a, text(i, ub, body)) {
                Body::SendAck(ack) => {
                    assert_eq!((ack.seq, ack.duplicate), (u64::from(i), false), "{driver}");
                }
                other => panic!("{driver}: {other:?}"),
            }
        }
        match call(&mut a, text(1, ub, "hello ben")) {
            Body::SendAck(ack) => {
                assert_eq!((ack.seq, ack.duplicate), (1, true), "{driver}");
            }
            other => panic!("{driver}: {other:?}"),
        }

        // B comes back and syncs from seq 1: gets 2 and 3, then SyncDone.
        let mut b = srv.hello(&gb.access_token);
        let id = b.next_id;
        b.next_id += 1;
        b.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: [(conv, 1)].into_iter().collect(),
            }),
        );
        let (_, before) = recv_until(&mut b, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let synced: Vec<u64> = before
            .iter()
            .filter(|f| f.request_id == id)
            .filter_map(|f| match &f.body {
                Some(Body::Deliver(d)) => d.message.as_ref().map(|m| m.seq),
                _ => None,
            })
            .collect();
        assert_eq!(synced, vec![2, 3], "{driver}: {before:?}");

        // History and the conversation list.
        match call(
            &mut b,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                limit: 10,
                ..Default::default()
            }),
        ) {
            Body::HistoryPage(p) => {
                let seqs: Vec<u64> = p.messages.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, vec![1, 2, 3], "{driver}");
                assert!(!p.has_more);
            }
            other => panic!("{driver}: {other:?}"),
        }
        match call(
            &mut a,
            Body::ListConversations(v1::ListConversations::default()),
        ) {
            Body::ConversationList(l) => {
                assert_eq!(l.conversations.len(), 1, "{driver}: {l:?}");
                let s = &l.conversations[0];
                assert_eq!(
                    (s.conversation_id, s.peer_user_id, s.last_seq),
                    (conv, ub, 3)
                );
            }
            other => panic!("{driver}: {other:?}"),
        }
        match call(
            &mut b,
            Body::ListConversations(v1::ListConversations::default()),
        ) {
            Body::ConversationList(l) => {
                assert_eq!(l.conversations.len(), 1, "{driver}: {l:?}");
                assert_eq!(l.conversations[0].peer_user_id, ua);
            }
            other => panic!("{driver}: {other:?}"),
        }

        // The metrics saw the four SendAcks and the log's group commits.
        assert_eq!(metric_sum(&srv, "starling_send_ack_seconds_count"), 4);
        assert_eq!(
            metric_sum(&srv, "starling_messages_acked_total"),
            3,
            "{driver}"
        );
        assert_eq!(
            metric_sum(&srv, "starling_send_duplicates_total"),
            1,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_delivers_pushed_total") >= 1,
            "{driver}"
        );
        assert_eq!(
            metric_sum(&srv, "starling_conversations_loaded"),
            1,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_log_syncs_total") >= 3,
            "{driver}"
        );
        assert!(
            metric_sum(&srv, "starling_log_records_total") >= 3,
            "{driver}"
        );
        assert!(metric_sum(&srv, "starling_log_commit_seconds_count") >= 3);
        // Every shard's log switched to its first segment at open.
        assert!(metric_sum(&srv, "starling_log_segment_switch_seconds_count") >= 1);
        let m = srv.metrics();
        for name in [
            "starling_send_ack_seconds",
            "starling_log_commit_seconds",
            "starling_log_segment_switch_seconds",
        ] {
            let counts: Vec<i64> = m
                .lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket{{shard=\"0\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            assert_eq!(counts.len(), 16, "{driver}: {m}");
            assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{driver}: {m}");
            let total = m
                .lines()
                .find(|l| l.starts_with(&format!("{name}_count{{shard=\"0\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok());
            assert_eq!(counts.last().copied(), total, "{driver}: {m}");
            assert!(m.contains(&format!("# TYPE {name} histogram")), "{m}");
        }
    }
}

/// Pipelines the `Send`s `msg(i)` for message indexes `indexes` until the
/// connection dies or all are acknowledged; returns the acknowledgements
/// (index → seq) received. Never panics on a dead connection.
fn send_stream(
    c: &mut Client,
    msg: &dyn Fn(u32) -> Body,
    indexes: &[u32],
    window: usize,
) -> std::collections::BTreeMap<u32, (u64, bool)> {
    use std::collections::{BTreeMap, HashMap};
    let mut acked = BTreeMap::new();
    let mut inflight: HashMap<u64, u32> = HashMap::new();
    let mut next = 0;
    loop {
        while inflight.len() < window && next < indexes.len() {
            let i = indexes[next];
            next += 1;
            let id = c.next_id;
            c.next_id += 1;
            let mut b = BytesMut::new();
            FrameEncoder::new(1 << 20)
                .encode(
                    &v1::Frame {
                        request_id: id,
                        body: Some(msg(i)),
                    },
                    &mut b,
                )
                .unwrap();
            if c.s.write_all(&b).and_then(|()| c.s.flush()).is_err() {
                return acked;
            }
            inflight.insert(id, i);
        }
        if inflight.is_empty() {
            return acked;
        }
        let Some(f) = c.recv() else { return acked };
        if let Some(i) = inflight.remove(&f.request_id) {
            match f.body {
                Some(Body::SendAck(a)) => {
                    acked.insert(i, (a.seq, a.duplicate));
                }
                other => panic!("send {i}: {other:?}"),
            }
        }
    }
}

/// Message `i` of a stream: client_msg_id and body both derived from `i`.
fn stream_msg(i: u32, to: u64) -> Body {
    let mut cmid = [0xa5u8; 16];
    cmid[..4].copy_from_slice(&i.to_be_bytes());
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: format!("message {i}").into_bytes().into(),
        ..Default::default()
    })
}

/// Every message of a conversation, by paging GetHistory after_seq.
fn whole_history(c: &mut Client, conv: u64) -> Vec<v1::Message> {
    let mut out: Vec<v1::Message> = Vec::new();
    loop {
        let after = out.last().map_or(0, |m| m.seq);
        match call(
            c,
            Body::GetHistory(v1::GetHistory {
                conversation_id: conv,
                anchor: Some(v1::get_history::Anchor::AfterSeq(after)),
                limit: 200,
            }),
        ) {
            Body::HistoryPage(p) => {
                let more = p.has_more;
                if p.messages.is_empty() {
                    return out;
                }
                out.extend(p.messages);
                if !more {
                    return out;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The server is killed with SIGKILL in the middle of a pipelined stream of
/// sends, three times. After each restart the client retries what was not
/// acknowledged (same client_msg_id, like the SDK's outbox). At the end:
/// every acknowledged message is stored with the seq it was acknowledged
/// with, seqs are contiguous, every message is stored exactly once, and the
/// messages acknowledged before a crash kept their send order.
#[test]
fn sigkill_mid_stream_loses_nothing_acknowledged() {
    use std::collections::BTreeMap;
    let seed = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .map_or(7, |d| d.subsec_nanos());
    println!("kill timing seed {seed}");
    let mut srv = Server::start("auto", "");
    let (mut a, ga, b, gb) = ana_and_ben(&srv);
    drop(b);
    // More than the server can take in the longest delay below, so every
    // kill lands in the middle of the stream.
    const TOTAL: u32 = 30_000;
    let mut acked: BTreeMap<u32, (u64, bool)> = BTreeMap::new();
    let mut rng = u64::from(seed) | 1;
    for round in 0..3 {
        // Send everything not yet acknowledged, in index order; kill the
        // server after a random delay.
        let pending: Vec<u32> = (0..TOTAL).filter(|i| !acked.contains_key(i)).collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(20 + rng % 180);
        let pid = srv.child.0.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // Safety: kill(2) on our own child process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let got = send_stream(&mut a, &|i| stream_msg(i, gb.user_id), &pending, 32);
        killer.join().unwrap();
        // Acknowledgements seen before the crash kept send order.
        let mut last = 0;
        for (i, (seq, dup)) in &got {
            if !dup {
                assert!(
                    *seq > last,
                    "round {round}: message {i} got seq {seq} after {last}"
                );
                last = *seq;
            }
        }
        for (i, ack) in got {
            if let Some(prev) = acked.insert(i, ack) {
                panic!("message {i} acknowledged twice: {prev:?} then {ack:?}");
            }
        }
        println!(
            "round {round}: killed after {delay:?}; {} of {TOTAL} acknowledged so far",
            acked.len()
        );
        assert!(
            acked.len() < TOTAL as usize,
            "the kill came after the stream ended"
        );
        srv = srv.kill9_and_restart("auto");
        a = srv.hello(&ga.access_token);
    }
    // Finish the stream after the last restart: retries of messages that
    // were stored but not acknowledged come back as duplicates with their
    // original seq.
    let pending: Vec<u32> = (0..TOTAL).filter(|i| !acked.contains_key(i)).collect();
    let got = send_stream(&mut a, &|i| stream_msg(i, gb.user_id), &pending, 32);
    assert_eq!(got.len(), pending.len(), "every retry is acknowledged");
    acked.extend(got);
    let duplicates = acked.values().filter(|(_, dup)| *dup).count();
    println!("{duplicates} retries were stored before a crash and came back as duplicates");
    assert_eq!(acked.len(), TOTAL as usize);

    // The recipient reads the whole conversation.
    let mut b = srv.hello(&gb.access_token);
    let conv = match call(
        &mut b,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => {
            assert_eq!(l.conversations.len(), 1);
            l.conversations[0].conversation_id
        }
        other => panic!("{other:?}"),
    };
    let history = whole_history(&mut b, conv);
    assert_eq!(
        history.len(),
        TOTAL as usize,
        "each message stored exactly once"
    );
    for (k, m) in history.iter().enumerate() {
        assert_eq!(m.seq, k as u64 + 1, "seqs are contiguous");
        let i = u32::from_be_bytes(m.client_msg_id[..4].try_into().unwrap());
        assert_eq!(m.body, format!("message {i}").into_bytes());
        assert_eq!(
            acked[&i].0, m.seq,
            "message {i} stored at its acknowledged seq"
        );
    }
}

/// One device in the multi-device test: its token, its connection when
/// online, and the seqs it has received, in arrival order.
struct Device {
    token: String,
    conn: Option<Client>,
    seqs: Vec<u64>,
}

impl Device {
    fn record(&mut self, m: &v1::Message) {
        if !self.seqs.contains(&m.seq) {
            self.seqs.push(m.seq);
        }
    }

    /// Connects (if offline) and syncs from its last seq, recording what
    /// the Sync returns; acknowledges delivery when `ack` is set.
    fn online(&mut self, srv: &Server, conv: u64, ack: bool) {
        if self.conn.is_none() {
            self.conn = Some(srv.hello(&self.token));
        }
        let last = self.seqs.iter().copied().max().unwrap_or(0);
        let c = self.conn.as_mut().unwrap();
        let id = c.next_id;
        c.next_id += 1;
        let mut last_seq = std::collections::BTreeMap::new();
        if conv != 0 {
            last_seq.insert(conv, last);
        }
        c.send(id, Body::Sync(v1::Sync { last_seq }));
        let (_, before) = recv_until(c, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let mut got = Vec::new();
        for f in before {
            if let Some(Body::Deliver(d)) = f.body {
                got.push(d.message.unwrap());
            }
        }
        for m in &got {
            self.record(m);
        }
        if let (true, Some(top)) = (ack, self.seqs.iter().copied().max()) {
            let c = self.conn.as_mut().unwrap();
            let done = call(
                c,
                Body::DeliveryAck(v1::DeliveryAck {
                    conversation_id: conv,
                    up_to_seq: top,
                }),
            );
            assert!(matches!(done, Body::Done(_)), "{done:?}");
        }
    }

    /// Waits for the Deliver of `seq`.
    fn expect_deliver(&mut self, seq: u64) {
        let c = self.conn.as_mut().unwrap();
        let (f, _) = recv_until(
            c,
            |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.seq == seq)),
        );
        let Some(Body::Deliver(d)) = f.body else {
            unreachable!()
        };
        self.record(&d.message.unwrap());
    }
}

/// Signs in a second device of an existing user by password.
fn second_device(srv: &Server, ident: Option<v1::Identifier>) -> v1::SessionGranted {
    let mut c = srv.hello("");
    match c.request(Body::Login(v1::Login {
        identifier: ident,
        credential: Some(v1::login::Credential::Password(
            "correct horse battery".into(),
        )),
        device: Some(v1::DeviceInfo {
            name: "second".into(),
            platform: "linux".into(),
        }),
    })) {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    }
}

/// Two users with two devices each. The sender's first device sends one
/// message in each of the eight online/offline combinations of the other
/// three devices. Online recipients get it pushed; the sender gets a
/// DELIVERED receipt as soon as one recipient device acknowledges (at once,
/// or when an offline recipient comes back and syncs); offline devices get
/// everything by Sync. At the end every device holds every message exactly
/// once, in order, and a READ receipt reaches both of the sender's devices.
#[test]
fn two_users_two_devices_every_online_offline_combination() {
    let srv = Server::start("auto", "");
    let mut users = Vec::new();
    for who in ["ana@example.org", "ben@example.org"] {
        let mut c = srv.hello("");
        let g = register(&srv, &mut c, email(who), who);
        let set = c.request(Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        }));
        assert!(matches!(set, Body::Done(_)), "{set:?}");
        let g2 = second_device(&srv, email(who));
        assert_ne!(g.device_id, g2.device_id);
        users.push((g, g2));
    }
    let (ga1, ga2) = users.remove(0);
    let (gb1, gb2) = users.remove(0);
    let dev = |g: &v1::SessionGranted| Device {
        token: g.access_token.clone(),
        conn: None,
        seqs: Vec::new(),
    };
    let mut a1 = dev(&ga1);
    let (mut a2, mut b1, mut b2) = (dev(&ga2), dev(&gb1), dev(&gb2));
    a1.conn = Some(srv.hello(&a1.token));
    let mut conv = 0;
    for combo in 0u8..8 {
        let (a2_on, b1_on, b2_on) = (combo & 1 != 0, combo & 2 != 0, combo & 4 != 0);
        for (d, on) in [(&mut a2, a2_on), (&mut b1, b1_on), (&mut b2, b2_on)] {
            if on {
                d.online(&srv, conv, false);
            } else {
                d.conn = None;
            }
        }
        let c = a1.conn.as_mut().unwrap();
        let ack = match call(c, text(100 + combo, gb1.user_id, &format!("combo {combo}"))) {
            Body::SendAck(a) => a,
            other => panic!("combo {combo}: {other:?}"),
        };
        conv = ack.conversation_id;
        let seq = ack.seq;
        assert_eq!(seq, u64::from(combo) + 1, "combo {combo}");
        a1.seqs.push(seq);
        for (d, on) in [(&mut a2, a2_on), (&mut b1, b1_on), (&mut b2, b2_on)] {
            if on {
                d.expect_deliver(seq);
            }
        }
        // The first recipient device to acknowledge triggers DELIVERED; if
        // both are offline, the first one back does (after its Sync).
        let acker = if b1_on {
            &mut b1
        } else if b2_on {
            &mut b2
        } else {
            &mut b1
        };
        acker.online(&srv, conv, true);
        for (d, on) in [(&mut a1, true), (&mut a2, a2_on)] {
            if on {
                let c = d.conn.as_mut().unwrap();
                let (r, _) = recv_until(c, |f| {
                    receipt(f).is_some_and(|r| {
                        r.kind == v1::ReceiptKind::Delivered as i32 && r.up_to_seq >= seq
                    })
                });
                assert_eq!(
                    receipt(&r).unwrap().by_user_id,
                    gb1.user_id,
                    "combo {combo}"
                );
            }
        }
        if !b1_on && !b2_on {
            b1.conn = None;
        }
    }
    // Everyone comes back and syncs; B reads everything.
    for d in [&mut a2, &mut b1, &mut b2] {
        d.online(&srv, conv, false);
    }
    let want: Vec<u64> = (1..=8).collect();
    for (name, d) in [("a1", &a1), ("a2", &a2), ("b1", &b1), ("b2", &b2)] {
        assert_eq!(d.seqs, want, "{name} holds every message once, in order");
    }
    let c = b1.conn.as_mut().unwrap();
    let done = call(
        c,
        Body::ReadCursor(v1::ReadCursor {
            conversation_id: conv,
            up_to_seq: 8,
        }),
    );
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    for d in [&mut a1, &mut a2] {
        let c = d.conn.as_mut().unwrap();
        let (r, _) = recv_until(c, |f| {
            receipt(f).is_some_and(|r| r.kind == v1::ReceiptKind::Read as i32 && r.up_to_seq == 8)
        });
        assert_eq!(receipt(&r).unwrap().by_user_id, gb1.user_id);
    }
}

/// The body of message `i` of stream `tag`: names both, padded to `len`.
/// A device that asked in Hello for the smallest frame limit (1 KiB) and is then sent a
/// message that does not fit: the server neither sends the frame nor drops it silently (the
/// device would miss it, or wait forever for an answer); it says Goodbye{FRAME_TOO_LARGE} and
/// closes that connection only. The message stays acknowledged and durable: a connection
/// with a larger limit gets it, and the sender's connection is untouched.
#[test]
fn a_frame_over_the_peers_limit_closes_only_that_connection() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let (mut a, ga, b, gb) = ana_and_ben(&srv);
        drop(b);
        let mut small = srv.connect();
        let w = small.request(Body::Hello(v1::Hello {
            protocol_version: 1,
            access_token: gb.access_token.clone(),
            frame_bytes_max: 1,
            ..Default::default()
        }));
        assert!(matches!(w, Body::Welcome(_)), "{driver}: {w:?}");

        // A small message fits: pushed as usual.
        exchange(&mut a, &mut small, gb.user_id, 7, 0);
        // A 2 KiB one does not: acknowledged to the sender all the same...
        let ack = match call(&mut a, sized_msg(7, 1, gb.user_id, 2048)) {
            Body::SendAck(ack) => ack,
            other => panic!("{driver}: {other:?}"),
        };
        assert_eq!(ack.seq, 2, "{driver}");
        // ...and the small connection is told why and closed.
        let (bye, _) = recv_until(&mut small, |f| matches!(f.body, Some(Body::Goodbye(_))));
        let Some(Body::Goodbye(bye)) = bye.body else {
            unreachable!()
        };
        assert_eq!(
            bye.code,
            ErrorCode::FrameTooLarge as i32,
            "{driver}: {bye:?}"
        );
        assert!(bye.message.contains("frame_bytes_max"), "{driver}: {bye:?}");
        small.expect_closed();

        // The sender's connection is unaffected.
        assert!(matches!(
            a.request(Body::Ping(v1::Ping { nonce: 3 })),
            Body::Pong(v1::Pong { nonce: 3 })
        ));
        // The recipient, reconnected with the default limit, has both messages.
        let mut b = srv.hello(&gb.access_token);
        let got = whole_history(&mut b, ack.conversation_id);
        let bodies: Vec<_> = got.iter().map(|m| (m.seq, m.body.to_vec())).collect();
        assert_eq!(
            bodies,
            vec![(1, sized_body(7, 0, 100)), (2, sized_body(7, 1, 2048))],
            "{driver}"
        );
        assert_eq!(got[0].sender_user_id, ga.user_id);
    }
}

fn sized_body(tag: u8, i: u32, len: usize) -> Vec<u8> {
    let mut b = format!("stream {tag} message {i} ").into_bytes();
    b.resize(len.max(b.len()), b'.');
    b
}

/// Message `i` of stream `tag` to user `to`: client_msg_id from (tag, i),
/// body `sized_body(tag, i, len)`.
fn sized_msg(tag: u8, i: u32, to: u64, len: usize) -> Body {
    let mut cmid = [tag; 16];
    cmid[..4].copy_from_slice(&i.to_be_bytes());
    Body::Send(v1::Send {
        client_msg_id: cmid.to_vec().into(),
        to: Some(v1::Recipient {
            target: Some(v1::recipient::Target::UserId(to)),
        }),
        content_type: "text/plain".into(),
        body: sized_body(tag, i, len).into(),
        ..Default::default()
    })
}

/// One message `from` → `to` (user `to_user`): acknowledged to the sender,
/// pushed to the recipient.
fn exchange(from: &mut Client, to: &mut Client, to_user: u64, tag: u8, i: u32) {
    match call(from, sized_msg(tag, i, to_user, 100)) {
        Body::SendAck(a) => assert!(!a.duplicate),
        other => panic!("{other:?}"),
    }
    let want = sized_body(tag, i, 100);
    recv_until(
        to,
        |f| matches!(&f.body, Some(Body::Deliver(d)) if d.message.as_ref().is_some_and(|m| m.body == want)),
    );
}

/// Issue #5: a device whose outbound budget is exhausted (it reads nothing)
/// stops getting pushes and gets a `MessagesAvailable` hint instead; it
/// catches up by Sync and loses nothing; other connections are never
/// stalled meanwhile. (If it stays over budget longer than the router's
/// slow-consumer close time, 30 s, it is closed with SLOW_CONSUMER
/// instead; then it reconnects and syncs, and still loses nothing.)
#[test]
fn slow_consumer_gets_hints_then_syncs_without_loss() {
    // 12 MB of pushes: far over the router's per-connection budget (256
    // KiB) plus what the kernel buffers (here ~3.5 MB: the server's send
    // buffer grows up to net.ipv4.tcp_wmem's maximum, 4 MiB by default,
    // even though B's receive buffer is small). Bodies stay at 1 KiB so
    // that one Sync answer (500 messages) fits the gateway's outbound
    // buffer (limits.outbound_bytes_max, 1 MiB) even without the router's
    // sync byte budget; the test below covers large bodies.
    for driver in DRIVERS {
        slow_consumer(driver, 12_000, 1024);
    }
}

/// Like the test above with 8 KiB bodies: 500 of them (4 MB) would not fit
/// one Sync answer into the gateway's per-connection outbound buffer, so the
/// router caps a Sync answer at `sync_bytes_max` and names the rest in
/// `SyncDone.truncated`; the device syncs again until it has everything.
#[test]
fn slow_consumer_with_large_bodies_catches_up_by_sync() {
    slow_consumer("auto", 1500, 8192);
}

#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn slow_consumer(driver: &str, total: u32, body: usize) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    const CLOSE_MS: u128 = 30_000; // ShardConfig::slow_consumer_close_ms
    let srv = Server::start(driver, "");
    let user = |who: &str| {
        let mut c = srv.hello("");
        let g = register(&srv, &mut c, email(who), who);
        (c, g)
    };
    let (mut a, _) = user("ana@example.org");
    let (_, gb) = user("ben@example.org");
    let (mut c, gc) = user("cleo@example.org");
    let (mut d, gd) = user("dan@example.org");

    // B's device connects with a small receive buffer, then reads nothing.
    let tcp = tcp_connect(srv.tls_addr, None, Some(16 * 1024)).unwrap();
    let mut b = Client::over(tcp, &srv.tls);
    let w = b.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        access_token: gb.access_token.clone(),
        ..Default::default()
    }));
    assert!(
        matches!(&w, Body::Welcome(w) if w.authenticated.is_some()),
        "{driver}: {w:?}"
    );

    // C and D talk on the same server the whole time.
    let rounds = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cd = {
        let (rounds, stop) = (rounds.clone(), stop.clone());
        let (uc, ud) = (gc.user_id, gd.user_id);
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Relaxed) && i < 100_000 {
                exchange(&mut c, &mut d, ud, 0xc0, i);
                exchange(&mut d, &mut c, uc, 0xd0, i);
                i += 1;
                rounds.store(i, Relaxed);
            }
            i
        })
    };

    // A sends everything to B; every message is acknowledged, in order.
    let t0 = now();
    let indexes: Vec<u32> = (0..total).collect();
    let acked = send_stream(
        &mut a,
        &|i| sized_msg(0xa0, i, gb.user_id, body),
        &indexes,
        32,
    );
    assert_eq!(acked.len(), total as usize, "{driver}");
    for (i, (seq, dup)) in &acked {
        assert_eq!((*seq, *dup), (u64::from(*i) + 1, false), "{driver}");
    }
    // B is far behind now; C and D still get acknowledgements and pushes.
    let r0 = rounds.load(Relaxed);
    let deadline = now() + Duration::from_secs(120);
    while rounds.load(Relaxed) < r0 + 10 {
        assert!(!cd.is_finished(), "{driver}: the C/D thread failed");
        assert!(now() < deadline, "{driver}: C and D are stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Relaxed);
    let cd_rounds = cd.join().expect("C/D exchange failed (see its panic)");
    let stalled = t0.elapsed();

    // B reads: the messages pushed before it went over budget, in order,
    // then a hint instead of the rest.
    let conv = match call(
        &mut a,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => l.conversations[0].conversation_id,
        other => panic!("{driver}: {other:?}"),
    };
    let mut have = 0u64;
    let mut hint = None;
    for _ in 0..=total {
        match b.recv().and_then(|f| f.body) {
            Some(Body::Deliver(dv)) => {
                let m = dv.message.unwrap();
                assert_eq!(m.seq, have + 1, "{driver}: pushes arrive in order");
                assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                have = m.seq;
            }
            Some(Body::MessagesAvailable(h)) => {
                hint = Some(h);
                break;
            }
            Some(Body::Goodbye(g)) => {
                assert_eq!(g.code, ErrorCode::SlowConsumer as i32, "{driver}: {g:?}");
                break;
            }
            None => break,
            Some(other) => panic!("{driver}: {other:?}"),
        }
    }
    let pushed = have;
    if let Some(h) = &hint {
        assert_eq!(h.conversation_id, conv, "{driver}");
        assert!(
            h.up_to_seq > pushed && h.up_to_seq <= u64::from(total),
            "{driver}: hint {h:?} after {pushed} pushes"
        );
    } else {
        // Closed: only acceptable as the slow-consumer close, after its time.
        assert!(
            stalled.as_millis() >= CLOSE_MS,
            "{driver}: B was closed after {stalled:?}, before the slow-consumer close time, having {pushed} pushes"
        );
        b = srv.hello(&gb.access_token);
    }
    assert!(
        pushed < u64::from(total),
        "{driver}: every message was pushed; the budget never ran out"
    );

    // B catches up by Sync from what it has: every message exactly once,
    // in order (per Sync at most 500 messages or 256 KiB of them).
    let per_sync = (256 * 1024 / (body as u32 + 64)).clamp(1, 500);
    let mut syncs = 0;
    while have < u64::from(total) {
        syncs += 1;
        assert!(
            syncs <= total / per_sync + 3,
            "{driver}: Sync makes no progress at {have}"
        );
        let id = b.next_id;
        b.next_id += 1;
        b.send(
            id,
            Body::Sync(v1::Sync {
                last_seq: [(conv, have)].into_iter().collect(),
            }),
        );
        let (_, before) = recv_until(&mut b, |f| {
            f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
        });
        let from = have;
        for f in before {
            match f.body {
                Some(Body::Deliver(dv)) if f.request_id == id => {
                    let m = dv.message.unwrap();
                    assert_eq!(m.seq, have + 1, "{driver}: synced in order, once");
                    assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                    have = m.seq;
                }
                // A hint emitted before this Sync reached the router.
                Some(Body::MessagesAvailable(_)) if f.request_id == 0 => {}
                // Once the backlog drained, the hint was sent and live pushes resumed: messages
                // A sent after it arrive as pushes too (the protocol allows them between a
                // Sync's frames); the Sync covers them again, as the client dedups by seq.
                Some(Body::Deliver(dv)) if f.request_id == 0 => {
                    let m = dv.message.unwrap();
                    assert!(
                        hint.as_ref().is_some_and(|h| m.seq > h.up_to_seq),
                        "{driver}: a live push of {} during a Sync, hint {hint:?}",
                        m.seq
                    );
                    assert_eq!(m.body, sized_body(0xa0, (m.seq - 1) as u32, body));
                }
                other => panic!("{driver}: during Sync {id}: {other:?}"),
            }
        }
        assert!(have > from, "{driver}: Sync from {from} returned nothing");
    }
    assert_eq!(have, u64::from(total), "{driver}");

    // Caught up: pushes resume.
    match call(&mut a, sized_msg(0xa0, total, gb.user_id, body)) {
        Body::SendAck(ack) => assert_eq!(ack.seq, u64::from(total) + 1, "{driver}"),
        other => panic!("{driver}: {other:?}"),
    }
    // (After live pushes that resumed during the Syncs, if any.)
    let (_, before) = recv_until(&mut b, |f| {
        matches!(&f.body, Some(Body::Deliver(dv))
            if dv.message.as_ref().is_some_and(|m| m.seq == u64::from(total) + 1))
    });
    for f in before {
        match f.body {
            Some(Body::Deliver(dv)) if f.request_id == 0 => {
                assert!(dv.message.unwrap().seq <= u64::from(total), "{driver}");
            }
            other => panic!("{driver}: before the new push: {other:?}"),
        }
    }
    println!(
        "{driver}: {pushed} of {total} pushed before the budget ran out, hint {:?}, the rest by {syncs} Syncs; C/D exchanged {cd_rounds} rounds meanwhile; B unread for {stalled:?}",
        hint.map(|h| h.up_to_seq)
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
#[path = "server/blocks.rs"]
mod blocks;
#[path = "server/cursors.rs"]
mod cursors;
#[path = "server/discovery.rs"]
mod discovery;
#[path = "server/faults.rs"]
mod faults;
#[path = "server/group_receipts.rs"]
mod group_receipts;
#[path = "server/groups.rs"]
mod groups;
#[path = "server/presence.rs"]
mod presence;
#[path = "server/read_fanout.rs"]
mod read_fanout;
#[path = "server/router_config.rs"]
mod router_config;
#[path = "server/spec.rs"]
mod spec;
#[path = "server/titles.rs"]
mod titles;
