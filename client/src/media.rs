//! Media transfers: the bytes of an attachment go over HTTPS to the server's media endpoint,
//! never in frames (`protocol/README.md`, "Media"). [`put_file`] streams a file to an
//! `UploadGrant`'s URL and [`get_to_file`] a `DownloadGrant`'s URL to a file, each in chunks of
//! [`CHUNK_BYTES`], so memory does not grow with the file; both report progress.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use ring::digest;
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};

use crate::error::ClientError;
use crate::tls::{self, TlsTrust};

/// Bytes read from a file per chunk of an upload.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Called with (bytes done, bytes in all) as a transfer proceeds.
pub type Progress = Box<dyn FnMut(u64, u64) + Send>;

/// Where a URL points: `https://host[:port]/path?query`.
struct Url {
    host: String,
    port: u16,
    path_and_query: String,
}

fn parse_url(url: &str) -> Result<Url, ClientError> {
    let bad = || ClientError::InvalidArgument(format!("not an https URL: {url:?}"));
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse().map_err(|_| bad())?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url {
        host: host.to_owned(),
        port,
        path_and_query: path.to_owned(),
    })
}

type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

async fn connect<B>(trust: &TlsTrust, url: &Url) -> Result<Sender<B>, ClientError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut cfg = (*tls::client_config(trust)?).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(tls::server_name(&url.host)?, tcp)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Media(format!("HTTP handshake: {e}")))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn refusal(status: http::StatusCode, body: hyper::body::Incoming) -> ClientError {
    let text = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    ClientError::Media(format!("media endpoint answered {status}: {text}"))
}

/// The SHA-256 and size of a file, read in chunks.
pub async fn hash_file(path: &Path) -> Result<([u8; 32], u64), ClientError> {
    use tokio::io::AsyncReadExt as _;
    let mut f = tokio::fs::File::open(path).await?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        n += k as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok((out, n))
}

/// PUTs the file at `path` to an upload grant's URL with its headers.
pub async fn put_file(
    trust: &TlsTrust,
    grant: &starling_protocol::v1::UploadGrant,
    path: &Path,
    mut progress: Progress,
) -> Result<(), ClientError> {
    let url = parse_url(&grant.upload_url)?;
    let file = tokio::fs::File::open(path).await?;
    let size = file.metadata().await?.len();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body = FileBody {
        file,
        remaining: size,
        buf: vec![0; CHUNK_BYTES],
        done: done.clone(),
    };
    let mut req = http::Request::builder()
        .method(grant.method.as_str())
        .uri(&url.path_and_query)
        .header(http::header::HOST, format!("{}:{}", url.host, url.port));
    for (k, v) in &grant.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(body)
        .map_err(|e| ClientError::Media(format!("bad upload request: {e}")))?;
    let mut sender = connect(trust, &url).await?;
    let send = sender.send_request(req);
    tokio::pin!(send);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let resp = loop {
        tokio::select! {
            r = &mut send => break r,
            _ = tick.tick() => progress(done.load(std::sync::atomic::Ordering::Relaxed), size),
        }
    }
    .map_err(|e| ClientError::Media(format!("upload: {e}")))?;
    let (parts, body) = resp.into_parts();
    if !parts.status.is_success() {
        return Err(refusal(parts.status, body).await);
    }
    progress(size, size);
    Ok(())
}

/// GETs a download grant's URL into `dest` (written to `dest.partial`, fsynced, then renamed),
/// checking that the bytes' SHA-256 is `media_id`. Returns the bytes written.
pub async fn get_to_file(
    trust: &TlsTrust,
    grant: &starling_protocol::v1::DownloadGrant,
    dest: &Path,
    progress: Progress,
) -> Result<u64, ClientError> {
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut f = tokio::fs::File::create(&partial).await?;
    let got = match get_to(trust, grant, &mut f, progress).await {
        Ok(n) => n,
        Err(e) => {
            drop(f);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&partial, dest).await?;
    Ok(got)
}

/// GETs a download grant's URL into `out`, checking that the bytes' SHA-256 is `media_id`
/// (an error after the last byte if not: discard what `out` got). Returns the bytes written.
pub async fn get_to<W: tokio::io::AsyncWrite + Unpin>(
    trust: &TlsTrust,
    grant: &starling_protocol::v1::DownloadGrant,
    out: &mut W,
    mut progress: Progress,
) -> Result<u64, ClientError> {
    let url = parse_url(&grant.download_url)?;
    let req = http::Request::builder()
        .method("GET")
        .uri(&url.path_and_query)
        .header(http::header::HOST, format!("{}:{}", url.host, url.port))
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| ClientError::Media(format!("bad download request: {e}")))?;
    let mut sender = connect(trust, &url).await?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Media(format!("download: {e}")))?;
    let (parts, mut body) = resp.into_parts();
    if !parts.status.is_success() {
        return Err(refusal(parts.status, body).await);
    }
    let total = body.size_hint().exact().unwrap_or(0);
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Media(format!("download: {e}")))?;
        if let Ok(data) = frame.into_data() {
            ctx.update(&data);
            out.write_all(&data).await?;
            got += data.len() as u64;
            progress(got, total.max(got));
        }
    }
    out.flush().await?;
    if hex::encode(ctx.finish()) != grant.media_id {
        return Err(ClientError::Media(
            "downloaded bytes do not match the media id (SHA-256)".into(),
        ));
    }
    Ok(got)
}

/// A request body read from a file, one chunk at a time as hyper asks for it.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
    done: Arc<std::sync::atomic::AtomicU64>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining)
            .unwrap_or(usize::MAX)
            .min(this.buf.len());
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
                this.remaining -= n as u64;
                this.done
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        let u = parse_url("https://127.0.0.1:7444/v1/media/ab?exp=1&sig=2").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 7444));
        assert_eq!(u.path_and_query, "/v1/media/ab?exp=1&sig=2");
        let u = parse_url("https://media.example/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("media.example", 443));
        let u = parse_url("https://[::1]:8443/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert!(parse_url("http://x/y").is_err());
        assert!(parse_url("https://:1/").is_err());
    }
}
