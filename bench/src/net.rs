//! Load-generator sockets: targets, source addresses, TLS, and a lean
//! Starling connection (frame codec over one stream, no extra tasks).
//!
//! The benchmark does not use the SDK's `Connection` on the data path: that
//! spawns an I/O task and queues per connection, and cannot bind a source
//! address. Here one task owns a socket and batches its writes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use starling_protocol::v1::{self, frame::Body};
use starling_protocol::{FrameDecoder, FrameEncoder, PROTOCOL_VERSION, limits};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// Which system and transport a workload talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Starling over TLS 1.3 (`tls://` or `starling://`).
    StarlingTls(SocketAddr),
    /// Starling's dangerous plaintext listener (`plain://`).
    StarlingPlain(SocketAddr),
    /// An MQTT 3.1.1 broker over plain TCP (`mqtt://`).
    Mqtt(SocketAddr),
    /// An MQTT 3.1.1 broker over TLS (`mqtts://`).
    MqttTls(SocketAddr),
}

impl Target {
    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = s
            .split_once("://")
            .with_context(|| format!("target must be SCHEME://HOST:PORT, got {s:?}"))?;
        let addr: SocketAddr = rest
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("target address must be IP:PORT, got {rest:?}"))?;
        Ok(match scheme {
            "tls" | "starling" => Target::StarlingTls(addr),
            "plain" | "starling+plain" => Target::StarlingPlain(addr),
            "mqtt" => Target::Mqtt(addr),
            "mqtts" => Target::MqttTls(addr),
            other => bail!("unknown target scheme {other:?} (tls, plain, mqtt, mqtts)"),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Target::StarlingTls(a)
            | Target::StarlingPlain(a)
            | Target::Mqtt(a)
            | Target::MqttTls(a) => *a,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Target::StarlingTls(_) | Target::MqttTls(_))
    }

    pub(crate) fn is_mqtt(&self) -> bool {
        matches!(self, Target::Mqtt(_) | Target::MqttTls(_))
    }
}

/// The `index`-th source address: 127.0.0.2, 127.0.0.3, ... cycling over
/// `count` addresses, so the ephemeral ports of many connections do not run
/// out (each source address has its own ~28,000 ports).
pub(crate) fn source_addr(index: u64, count: u32, dst: SocketAddr) -> Option<SocketAddr> {
    if count == 0 || !dst.ip().is_loopback() || !dst.is_ipv4() {
        return None;
    }
    let n = 2 + (index % u64::from(count.min(250))) as u8;
    Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)), 0))
}

/// The TLS client configuration a subcommand uses for `target`: `None` for a plaintext target;
/// for a TLS one, the CA in `ca` or else the development CA the server wrote into
/// `DATA_DIR/tls/ca.pem` (`resume` as in [`tls_config`]).
pub(crate) fn tls_for(
    target: &Target,
    ca: Option<&Path>,
    data_dir: Option<&Path>,
    resume: bool,
) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if !target.is_tls() {
        return Ok(None);
    }
    let ca = match (ca, data_dir) {
        (Some(ca), _) => ca.to_path_buf(),
        (None, Some(d)) => d.join("tls/ca.pem"),
        (None, None) => bail!("TLS needs --ca or --data-dir"),
    };
    tls_config(&ca, resume).map(Some)
}

/// TLS 1.3 client configuration trusting the CA in `ca_pem`. `resume`
/// keeps rustls's in-memory session cache (tickets are used if the server
/// sends any); otherwise every handshake is a full one.
pub(crate) fn tls_config(ca_pem: &Path, resume: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading CA {}", ca_pem.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing CA {}", ca_pem.display()))?)
            .context("adding the CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// A plain or TLS client stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// TCP connect from `source` (if any), then the TLS handshake if `tls`
    /// is given; both within `timeout`.
    pub(crate) async fn connect(
        dst: SocketAddr,
        source: Option<SocketAddr>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let fut = async {
            let sock = TcpSocket::new_v4()?;
            if let Some(src) = source {
                sock.bind(src)
                    .with_context(|| format!("binding source address {src}"))?;
            }
            let tcp = sock
                .connect(dst)
                .await
                .with_context(|| format!("connecting to {dst}"))?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Ok(Stream::Plain(tcp)),
                Some(cfg) => {
                    let name = ServerName::IpAddress(dst.ip().into());
                    let s = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await
                        .context("TLS handshake")?;
                    Ok(Stream::Tls(Box::new(s)))
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("connect to {dst} timed out after {timeout:?}"))?
    }

    /// Whether the TLS session was resumed.
    pub(crate) fn resumed(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(s) => {
                s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
            }
        }
    }

    /// Closes abruptly (RST), as a dropped network would look to the server
    /// only much faster; used by the reconnect storm.
    pub(crate) fn abort(self) {
        let tcp = match self {
            Stream::Plain(t) => t,
            Stream::Tls(s) => s.into_inner().0,
        };
        // A zero linger does not block on drop (it resets at once).
        #[allow(deprecated)]
        let _ = tcp.set_linger(Some(Duration::ZERO));
        drop(tcp);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One Starling connection: a stream, the frame codec and a write buffer.
/// Frames are queued with [`push`](Self::push) and go out together on
/// [`flush`](Self::flush) (one write for a whole batch).
#[derive(Debug)]
pub(crate) struct StarlingConn {
    pub(crate) stream: Stream,
    dec: FrameDecoder,
    enc: FrameEncoder,
    wbuf: BytesMut,
    next_rid: u64,
}

/// How many bytes one read asks for.
const READ_CHUNK: usize = 16 * 1024;

impl StarlingConn {
    /// A connection to `dst` from `source` (TLS if `tls`), signed in by `Hello` with `token`
    /// (`who` names the account in an error); the connect and handshake within `timeout`.
    pub(crate) async fn open_authenticated(
        dst: SocketAddr,
        source: Option<SocketAddr>,
        tls: Option<&Arc<rustls::ClientConfig>>,
        timeout: Duration,
        token: &str,
        who: &str,
    ) -> anyhow::Result<Self> {
        let mut c = Self::new(Stream::connect(dst, source, tls, timeout).await?);
        c.hello(Some(token))
            .await
            .with_context(|| format!("authenticating {who}"))?;
        Ok(c)
    }

    pub(crate) fn new(stream: Stream) -> Self {
        Self {
            stream,
            dec: FrameDecoder::new(limits::FRAME_BYTES_MAX_DEFAULT),
            enc: FrameEncoder::new(limits::FRAME_BYTES_MAX_DEFAULT),
            wbuf: BytesMut::new(),
            next_rid: 1,
        }
    }

    /// A fresh request id.
    pub(crate) fn rid(&mut self) -> u64 {
        let r = self.next_rid;
        self.next_rid += 1;
        r
    }

    /// Queues one frame.
    pub(crate) fn push(&mut self, request_id: u64, body: Body) -> anyhow::Result<()> {
        let frame = v1::Frame {
            request_id,
            body: Some(body),
        };
        self.enc.encode(&frame, &mut self.wbuf)?;
        Ok(())
    }

    /// Queues raw, already encoded frames.
    pub(crate) fn push_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    pub(crate) fn pending_write(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes everything queued.
    pub(crate) async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads once into the decoder (cancel-safe). `Ok(0)` is end of stream.
    pub(crate) async fn read_some(&mut self) -> anyhow::Result<usize> {
        let buf = self.dec.read_buf();
        buf.reserve(READ_CHUNK);
        Ok(self.stream.read_buf(buf).await?)
    }

    /// The next whole frame already received.
    pub(crate) fn next_frame(&mut self) -> anyhow::Result<Option<v1::Frame>> {
        Ok(self.dec.poll_frame()?)
    }

    /// Drops the read buffer when it holds nothing (idle connections).
    pub(crate) fn release_buffer(&mut self) {
        self.dec.release_buffer();
    }

    /// The decoder's buffered bytes, for scanners that skip decoding.
    pub(crate) fn raw_buf(&mut self) -> &mut BytesMut {
        self.dec.read_buf()
    }

    /// Waits for the next frame.
    pub(crate) async fn recv(&mut self) -> anyhow::Result<v1::Frame> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(f);
            }
            if self.read_some().await? == 0 {
                bail!("server closed the connection");
            }
        }
    }

    /// Sends one request and waits for the frame answering it (pushes in
    /// between are dropped).
    pub(crate) async fn request(&mut self, body: Body) -> anyhow::Result<Body> {
        let rid = self.rid();
        self.push(rid, body)?;
        self.flush().await?;
        loop {
            let f = self.recv().await?;
            if f.request_id == rid {
                return f.body.context("answer without a body");
            }
        }
    }

    /// Hello (with `token` if given) → Welcome. With a token, the Welcome
    /// must say the connection is authenticated.
    pub(crate) async fn hello(&mut self, token: Option<&str>) -> anyhow::Result<v1::Welcome> {
        let body = Body::Hello(v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: Some(v1::ClientInfo {
                app: "starling-bench".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                platform: std::env::consts::OS.to_owned(),
            }),
            access_token: token.unwrap_or_default().to_owned(),
            frame_bytes_max: 0,
        });
        match self.request(body).await? {
            Body::Welcome(w) => {
                if token.is_some() && w.authenticated.is_none() {
                    // The server refused the token: the Welcome says why.
                    let why = w
                        .auth_error
                        .as_ref()
                        .map_or_else(|| "no reason given".to_owned(), describe_error);
                    bail!("the access token was refused: {why}");
                }
                Ok(w)
            }
            Body::Error(e) => bail!("Hello refused: {}", describe_error(&e)),
            other => bail!("unexpected answer to Hello: {}", other.kind().name()),
        }
    }
}

/// `CODE_NAME (code): message`.
pub(crate) fn describe_error(e: &v1::Error) -> String {
    let name = v1::ErrorCode::try_from(e.code).map_or_else(
        |_| format!("code {}", e.code),
        |c| c.as_str_name().to_owned(),
    );
    format!("{name}: {}", e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_for_is_none_for_plaintext_and_names_the_missing_ca() {
        let plain = Target::parse("plain://127.0.0.1:7000").unwrap();
        assert!(tls_for(&plain, None, None, false).unwrap().is_none());
        let mqtt = Target::parse("mqtt://127.0.0.1:1883").unwrap();
        assert!(tls_for(&mqtt, None, None, false).unwrap().is_none());

        let tls = Target::parse("tls://127.0.0.1:7443").unwrap();
        let e = tls_for(&tls, None, None, false).unwrap_err();
        assert!(
            format!("{e:#}").contains("TLS needs --ca or --data-dir"),
            "{e:#}"
        );
        // Without --ca, the CA is looked for in the data directory, and that path is named.
        let e = tls_for(&tls, None, Some(Path::new("/nonexistent-dir")), false).unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent-dir/tls/ca.pem"),
            "{e:#}"
        );
    }
}
