//! A blocking HTTPS/1.1 client for the notifier's thread (Web Push, FCM): rustls (ring) over a
//! `TcpStream`, keep-alive (an idle connection per host is reused; one the server closed while
//! idle is replaced and the request sent again), timeouts on connect, write and read, and the
//! answer capped. The notifier's sender threads share one client per provider: each request
//! takes an idle connection to its host (or opens one) and puts it back after the answer, so
//! as many requests are in flight as there are senders, each on its own connection. APNs,
//! which requires HTTP/2, has its own client (`push/apns.rs`).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, TcpStream, ToSocketAddrs as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

/// Bytes of an answer read at most (head and body).
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// A push service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// `Retry-After` in seconds, if given as seconds.
    pub retry_after_s: Option<u64>,
    /// The body (at most [`RESPONSE_BYTES_MAX`] with the head).
    pub body: String,
}

/// The TLS client configuration for push services: TLS 1.2/1.3 with ring, the CAs of
/// `ca_file` (PEM) as roots.
pub fn tls_config(ca_file: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| anyhow::anyhow!("push.ca_file {}: {e}", ca_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("push.ca_file {}: {e}", ca_file.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!(
            "push.ca_file {}: no usable CA certificate",
            ca_file.display()
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// An `https://` URL's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Host (a name, or an IP address; IPv6 without brackets).
    pub host: String,
    /// Port (443 unless given).
    pub port: u16,
    /// Path and query (`/` at least).
    pub path: String,
}

impl Url {
    /// Parses an `https://host[:port][/path]` URL.
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("not an https URL: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("bad host in {url}"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("bad port in {url}"))?,
            None => 443,
        };
        if host.is_empty() || authority.contains('@') {
            return Err(format!("bad host in {url}"));
        }
        Ok(Url {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `scheme://host[:port]`, the origin (VAPID's `aud`).
    #[must_use]
    pub fn origin(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            format!("https://{host}")
        } else {
            format!("https://{host}:{}", self.port)
        }
    }
}

/// Whether `ip` is not a public unicast address: loopback, private (RFC 1918, unique local),
/// link-local, carrier-grade NAT, unspecified, multicast or broadcast.
#[must_use]
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Where a request may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Any address (the operator configured the URL).
    Any,
    /// Public addresses only (the URL came from a client: a Web Push endpoint).
    PublicOnly,
}

/// Why a POST got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostError {
    /// The host resolves to an address `Reach::PublicOnly` refuses.
    Refused(String),
    /// No answer (resolution, connection, TLS, timeout): worth retrying.
    Failed(String),
}

/// Idle connections kept at most (per provider): enough for every sender thread to keep one
/// to each of a few hosts.
const IDLE_CONNECTIONS_MAX: usize = 1024;
/// An idle connection older than this is closed rather than reused (servers close theirs
/// after a minute or more; reusing one they are closing costs a retry).
const IDLE_MAX_MS: u64 = 30_000;

type Stream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Idle connections per host and port, each with when it became idle (`clock::mono_ms`).
type Idle = HashMap<(String, u16), Vec<(Stream, u64)>>;

/// A blocking HTTPS/1.1 client with keep-alive, shared by threads: a request takes an idle
/// connection to its host and port if there is one (the most recently used) and puts it back
/// after the answer (at most [`IDLE_CONNECTIONS_MAX`] are kept, each for [`IDLE_MAX_MS`]).
/// Requests run in parallel; only taking and putting back a connection is under the lock.
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    idle: Mutex<Idle>,
    opened: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

/// Why an exchange failed.
enum Failure {
    /// Nothing was answered on a reused connection (the server closed it while idle): the
    /// request is sent again on a new one.
    Stale(String),
    /// Anything else.
    Failed(String),
}

impl Client {
    /// A client checking certificates with `tls`, with `timeout` on connect, write and read.
    #[must_use]
    pub fn new(tls: Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        Self {
            tls,
            timeout,
            idle: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
        }
    }

    /// Connections opened so far.
    #[must_use]
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // A thread that panicked holding the lock left the map consistent (no method panics
        // between its reads and writes): keep using it.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection to `key` that is young enough, the most recently used first.
    fn take(&self, key: &(String, u16)) -> Option<Stream> {
        let now = crate::clock::mono_ms();
        let mut idle = self.idle();
        let list = idle.get_mut(key)?;
        let found = loop {
            match list.pop() {
                Some((s, at)) if now.saturating_sub(at) < IDLE_MAX_MS => break Some(s),
                Some(_) => {}
                None => break None,
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// POSTs `body` to `url` with `headers`, on an idle connection to its host if there is
    /// one (whose address was checked against `reach` when it was opened).
    pub fn post(
        &self,
        url: &Url,
        headers: &[(&str, String)],
        body: &[u8],
        reach: Reach,
    ) -> Result<Response, PostError> {
        let key = (url.host.clone(), url.port);
        if let Some(mut s) = self.take(&key) {
            match exchange(&mut s, url, headers, body) {
                Ok((r, reusable)) => {
                    self.keep(key, s, reusable);
                    return Ok(r);
                }
                Err(Failure::Stale(why)) => {
                    tracing::debug!(%why, "idle push connection closed: reconnecting");
                }
                Err(Failure::Failed(why)) => return Err(PostError::Failed(why)),
            }
        }
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| PostError::Failed(format!("resolving {}: {e}", url.host)))?
            .next()
            .ok_or_else(|| PostError::Failed(format!("{} has no address", url.host)))?;
        if reach == Reach::PublicOnly && is_private(addr.ip()) {
            return Err(PostError::Refused(format!(
                "{} is at {}, not a public address",
                url.host,
                addr.ip()
            )));
        }
        let mut s = connect(&self.tls, url, addr, self.timeout).map_err(PostError::Failed)?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        match exchange(&mut s, url, headers, body) {
            Ok((r, reusable)) => {
                self.keep(key, s, reusable);
                Ok(r)
            }
            Err(Failure::Stale(why) | Failure::Failed(why)) => Err(PostError::Failed(why)),
        }
    }

    fn keep(&self, key: (String, u16), s: Stream, reusable: bool) {
        if !reusable {
            return;
        }
        let now = crate::clock::mono_ms();
        let mut idle = self.idle();
        let mut count: usize = idle.values().map(Vec::len).sum();
        if count >= IDLE_CONNECTIONS_MAX {
            for list in idle.values_mut() {
                list.retain(|(_, at)| now.saturating_sub(*at) < IDLE_MAX_MS);
            }
            idle.retain(|_, list| !list.is_empty());
            count = idle.values().map(Vec::len).sum();
        }
        if count < IDLE_CONNECTIONS_MAX {
            idle.entry(key).or_default().push((s, now));
        }
    }
}

fn connect(
    tls: &Arc<rustls::ClientConfig>,
    url: &Url,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> Result<Stream, String> {
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(url.host.clone()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| e.to_string())?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// One request and its answer; whether the connection may carry another.
fn exchange(
    s: &mut Stream,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<(Response, bool), Failure> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        url.path,
        url.origin().trim_start_matches("https://"),
        body.len()
    );
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .and_then(|()| s.flush())
        .map_err(|e| Failure::Stale(format!("writing to {}: {e}", url.origin())))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut want: Option<Framing> = None;
    loop {
        if let Some(f) = &want
            && let Some(done) = f.complete(&raw)
        {
            let (resp, reusable) = done.map_err(Failure::Failed)?;
            return Ok((resp, reusable));
        }
        if raw.len() as u64 > RESPONSE_BYTES_MAX {
            return Err(Failure::Failed(format!(
                "{}: answer over {RESPONSE_BYTES_MAX} bytes",
                url.origin()
            )));
        }
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            // A server that closes without close_notify after a complete answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) if raw.is_empty() => {
                return Err(Failure::Stale(format!(
                    "reading from {}: {e}",
                    url.origin()
                )));
            }
            Err(e) => {
                return Err(Failure::Failed(format!(
                    "reading from {}: {e}",
                    url.origin()
                )));
            }
        };
        if n == 0 {
            if raw.is_empty() {
                return Err(Failure::Stale(format!(
                    "{} closed the connection",
                    url.origin()
                )));
            }
            // Closed: the answer is what was read (a body delimited by the close).
            return match want {
                Some(Framing::UntilClose) | None => parse_response(&raw)
                    .map(|r| (r, false))
                    .map_err(Failure::Failed),
                Some(_) => Err(Failure::Failed(format!(
                    "{} closed the connection inside an answer",
                    url.origin()
                ))),
            };
        }
        raw.extend_from_slice(&buf[..n]);
        if want.is_none()
            && let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n")
        {
            want = Some(Framing::of(&raw[..i], i + 4).map_err(Failure::Failed)?);
        }
    }
}

/// How an answer's body ends.
enum Framing {
    /// `Content-Length` bytes after the head (which ends at `.0`); `.2`: the server keeps
    /// the connection open.
    Length(usize, usize, bool),
    /// `Transfer-Encoding: chunked`, from `.0`.
    Chunked(usize, bool),
    /// Neither: the body ends when the server closes.
    UntilClose,
}

impl Framing {
    fn of(head: &[u8], body_at: usize) -> Result<Framing, String> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or("not an HTTP answer")?;
        let (mut length, mut chunked, mut keep) = (None, false, true);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                keep &= !v.eq_ignore_ascii_case("close");
            }
        }
        Ok(if chunked {
            Framing::Chunked(body_at, keep)
        } else if let Some(n) = length {
            Framing::Length(body_at, n, keep)
        } else if status == 204 || status == 304 {
            Framing::Length(body_at, 0, keep)
        } else {
            Framing::UntilClose
        })
    }

    /// The answer, once `raw` holds all of it.
    fn complete(&self, raw: &[u8]) -> Option<Result<(Response, bool), String>> {
        match *self {
            Framing::Length(at, n, keep) => {
                (raw.len() >= at + n).then(|| parse_response(&raw[..at + n]).map(|r| (r, keep)))
            }
            Framing::Chunked(at, keep) => {
                let mut body = Vec::new();
                let mut i = at;
                loop {
                    let eol = raw[i..].windows(2).position(|w| w == b"\r\n")? + i;
                    let size = std::str::from_utf8(&raw[i..eol]).ok().and_then(|l| {
                        usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok()
                    });
                    let Some(size) = size else {
                        return Some(Err("bad chunk size".to_owned()));
                    };
                    if size == 0 {
                        // The last chunk: the blank line (after any trailers) ends it.
                        raw[eol..].windows(4).position(|w| w == b"\r\n\r\n")?;
                        let mut whole = raw[..at].to_vec();
                        whole.extend_from_slice(&body);
                        return Some(parse_response(&whole).map(|r| (r, keep)));
                    }
                    if raw.len() < eol + 2 + size + 2 {
                        return None;
                    }
                    body.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
                    i = eol + 2 + size + 2;
                }
            }
            Framing::UntilClose => None,
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
    let retry_after_s = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("retry-after")
            .then(|| v.trim().parse().ok())?
    });
    Ok(Response {
        status,
        retry_after_s,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_answers_parse() {
        let u = Url::parse("https://push.example.net/w/1?x=2").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("push.example.net", 443, "/w/1?x=2")
        );
        assert_eq!(u.origin(), "https://push.example.net");
        let u = Url::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8443, "/"));
        assert_eq!(u.origin(), "https://127.0.0.1:8443");
        let u = Url::parse("https://[::1]:9/p").unwrap();
        assert_eq!(
            (u.host.as_str(), u.origin()),
            ("::1", "https://[::1]:9".to_owned())
        );
        assert!(Url::parse("http://x/").is_err());
        assert!(Url::parse("https://u@x/").is_err());
        assert!(Url::parse("https://x:port/").is_err());
        let r = parse_response(b"HTTP/1.1 429 Too Many\r\nretry-after: 7\r\n\r\nslow").unwrap();
        assert_eq!(
            (r.status, r.retry_after_s, r.body.as_str()),
            (429, Some(7), "slow")
        );
        assert!(parse_response(b"garbage").is_err());
        // Keep-alive framing: by length, chunked, until the close.
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA";
        let f = Framing::of(&raw[..34], 38).unwrap();
        let (r, keep) = f.complete(raw).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str(), keep), (200, "ok", true));
        assert!(f.complete(&raw[..39]).is_none(), "incomplete");
        let raw = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let f = Framing::of(&raw[..at], at + 4).unwrap();
        assert!(
            f.complete(&raw[..raw.len() - 2]).is_none(),
            "no blank line yet"
        );
        let (r, keep) = f.complete(raw).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_str(), keep), (201, "abcde", false));
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
        let (r, keep) = Framing::of(&raw[..23], 27)
            .unwrap()
            .complete(raw)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, keep), (204, true));
        let raw = b"HTTP/1.1 200 OK\r\n\r\nbody";
        assert!(matches!(
            Framing::of(&raw[..15], 19).unwrap(),
            Framing::UntilClose
        ));
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "142.250.1.1", "2a00:1450::1", "100.128.0.1"] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }
    /// A local HTTPS/1.1 server answering `answers` in order, one list per connection; each
    /// connection closes after its list (as a server closing an idle connection does).
    fn server(per_conn: Vec<Vec<&'static str>>) -> (u16, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        let client = tls_config(&ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                )
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for answers in per_conn {
                let (tcp, _) = listener.accept().unwrap();
                let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                for a in answers {
                    let mut raw = Vec::new();
                    let mut buf = [0u8; 1024];
                    // Requests here have an empty body: the head is the request.
                    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0);
                        raw.extend_from_slice(&buf[..n]);
                    }
                    s.write_all(a.as_bytes()).unwrap();
                    s.flush().unwrap();
                }
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        });
        (port, client)
    }

    #[test]
    fn a_kept_connection_is_reused_and_replaced_once_the_server_closed_it() {
        let ok = "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        let (port, tls) = server(vec![vec![ok, chunked], vec![ok]]);
        let mut c = Client::new(tls, Duration::from_secs(5));
        let url = Url::parse(&format!("https://127.0.0.1:{port}/p")).unwrap();
        let post = |c: &mut Client| c.post(&url, &[], b"", Reach::Any).unwrap();
        assert_eq!(post(&mut c).status, 201);
        let r = post(&mut c);
        assert_eq!((r.status, r.body.as_str()), (200, "hi"));
        assert_eq!(c.connections_opened(), 1, "reused");
        // The server closed that connection: the request goes again on a new one.
        assert_eq!(post(&mut c).status, 201);
        assert_eq!(c.connections_opened(), 2);
    }
}
