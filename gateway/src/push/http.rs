//! A blocking HTTPS/1.1 POST for the notifier's thread: rustls (ring) over a `TcpStream`, one
//! request per connection (`Connection: close`), timeouts on connect, write and read, and the
//! answer's body capped. The notifier sends one request at a time, so a client library with
//! pooling and HTTP/2 would buy nothing yet and add hyper, h2 and a runtime to the build.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
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

/// POSTs `body` to `url` with `headers`.
pub fn post(
    tls: &Arc<rustls::ClientConfig>,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
    reach: Reach,
) -> Result<Response, PostError> {
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
    send(tls, url, addr, headers, body, timeout).map_err(PostError::Failed)
}

fn send(
    tls: &Arc<rustls::ClientConfig>,
    url: &Url,
    addr: std::net::SocketAddr,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(url.host.clone()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
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
        .map_err(|e| format!("writing to {}: {e}", url.origin()))?;
    let mut raw = Vec::new();
    match s.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("reading from {}: {e}", url.origin())),
    }
    parse_response(&raw)
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
}
