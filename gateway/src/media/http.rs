//! The HTTPS media endpoint: hyper's HTTP/1.1 server on a tokio runtime of its own threads
//! (`media.threads`), TLS by tokio-rustls with the server's certificate. `PUT` stores an object
//! from a signed upload URL, `GET` serves one (with a single `Range`) from a signed download
//! URL. Bytes are streamed both ways: an upload is hashed as it arrives and written in batches of
//! about [`WRITE_CHUNK_BYTES`] (the chunks hyper hands over, not copied), a download read in
//! chunks of [`READ_CHUNK_BYTES`] as the socket takes them, so the server's memory does not grow
//! with the size of a file.

use std::convert::Infallible;
use std::io;
use std::net::TcpListener;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use ring::digest;

use super::Media;
use super::sign::{Grant, UrlError};
use super::store::{ObjectReader, PendingObject};

/// Bytes of an upload gathered before they are written to the temporary file (and their
/// writeback started).
pub(crate) const WRITE_CHUNK_BYTES: usize = 1024 * 1024;
/// Bytes of a download read from the store at a time.
pub(crate) const READ_CHUNK_BYTES: usize = 256 * 1024;

type RespBody = UnsyncBoxBody<Bytes, io::Error>;

/// Starts the endpoint's thread and runtime on `listener`.
pub(crate) fn spawn(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    media: Arc<Media>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(media.cfg.threads)
        // Disk writes and reads run under `block_in_place`, which hands the worker's place to a
        // thread of this pool while the calling thread blocks; a small cap bounds the threads
        // (and the allocator's per-thread memory) however many transfers run.
        .max_blocking_threads(media.cfg.threads * 4)
        .thread_name("media")
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("media-accept".into())
        .spawn(move || rt.block_on(accept_loop(listener, tls, media)))?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>, media: Arc<Media>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "media listener");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(media.cfg.connections_max));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "media accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, media) = (acceptor.clone(), media.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let media = media.clone();
                async move { Ok::<_, Infallible>(handle(&media, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service);
            let _ = conn.await;
        });
    }
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn url_refusal(e: &UrlError) -> Response<RespBody> {
    match e {
        UrlError::Malformed(why) => text(StatusCode::BAD_REQUEST, why),
        UrlError::BadSignature => text(
            StatusCode::FORBIDDEN,
            "the URL's signature does not match (altered, or made for another method)",
        ),
        UrlError::Expired => text(StatusCode::FORBIDDEN, "the URL has expired"),
    }
}

async fn handle(m: &Media, req: Request<Incoming>) -> Response<RespBody> {
    let now = crate::clock::unix_ms();
    let (path, query) = (req.uri().path(), req.uri().query().unwrap_or(""));
    let method = match *req.method() {
        Method::PUT => "PUT",
        Method::GET | Method::HEAD => "GET",
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "PUT or GET only"),
    };
    let (id, grant) = match m.signer.check(method, path, query, now) {
        Ok(g) => g,
        Err(e) => return url_refusal(&e),
    };
    match grant {
        Grant::Put { size, content_type } => {
            let r = put(m, req, &id, size, &content_type).await;
            let counter = if r.status() == StatusCode::CREATED {
                &m.stats.uploads
            } else {
                &m.stats.uploads_refused
            };
            counter.fetch_add(1, Ordering::Relaxed);
            r
        }
        Grant::Get => get(m, &req, &id),
    }
}

async fn put(
    m: &Media,
    req: Request<Incoming>,
    id: &str,
    size: u64,
    content_type: &str,
) -> Response<RespBody> {
    if size > m.cfg.size_bytes_max {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "over the server's size limit",
        );
    }
    if !m.allows(content_type) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type not accepted",
        );
    }
    let h = req.headers();
    if h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some(content_type) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be the grant's content type",
        );
    }
    let Some(len) = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return text(StatusCode::LENGTH_REQUIRED, "Content-Length is required");
    };
    if len > size {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "more bytes than the grant's size",
        );
    }
    if len < size {
        return text(StatusCode::BAD_REQUEST, "fewer bytes than the grant's size");
    }
    let store = m.store.clone();
    let id_owned = id.to_owned();
    let mut pending: Box<dyn PendingObject> =
        match tokio::task::block_in_place(|| store.begin(&id_owned)) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "media: starting an upload");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "storage error");
            }
        };
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut got = 0u64;
    // The body's chunks as hyper hands them over (no copy), written together once they add up
    // to WRITE_CHUNK_BYTES.
    let (mut chunks, mut chunked) = (Vec::<Bytes>::new(), 0usize);
    let mut body = req.into_body();
    // Dropping `pending` on any early return removes the temporary file.
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return text(StatusCode::BAD_REQUEST, "the upload broke off");
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got += data.len() as u64;
        if got > size {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "more bytes than the grant's size",
            );
        }
        hash.update(&data);
        chunked += data.len();
        chunks.push(data);
        if chunked >= WRITE_CHUNK_BYTES {
            if let Err(e) = tokio::task::block_in_place(|| write_chunks(&mut *pending, &chunks)) {
                tracing::error!(error = %e, "media: writing an upload");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "storage error");
            }
            (chunks, chunked) = (Vec::new(), 0);
        }
    }
    if got != size {
        return text(StatusCode::BAD_REQUEST, "fewer bytes than the grant's size");
    }
    if hex::encode(hash.finish()) != id {
        return text(
            StatusCode::BAD_REQUEST,
            "the bytes' SHA-256 is not the media id",
        );
    }
    let done = tokio::task::block_in_place(|| {
        write_chunks(&mut *pending, &chunks)?;
        pending.commit()
    });
    if let Err(e) = done {
        tracing::error!(error = %e, "media: committing an upload");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "storage error");
    }
    text(StatusCode::CREATED, "stored")
}

fn write_chunks(pending: &mut dyn PendingObject, chunks: &[Bytes]) -> io::Result<()> {
    for c in chunks {
        pending.write(c)?;
    }
    pending.flush_hint();
    Ok(())
}

fn get(m: &Media, req: &Request<Incoming>, id: &str) -> Response<RespBody> {
    let (reader, len) = match tokio::task::block_in_place(|| m.store.open(id)) {
        Ok(Some(o)) => o,
        Ok(None) => return text(StatusCode::NOT_FOUND, "no such object"),
        Err(e) => {
            tracing::error!(error = %e, "media: opening an object");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "storage error");
        }
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().ok().and_then(|v| parse_range(v, len)));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(None) => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "unsatisfiable Range");
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    m.stats.downloads.fetch_add(1, Ordering::Relaxed);
    let body = if req.method() == Method::HEAD {
        FileBody::new(reader, start, start)
    } else {
        FileBody::new(reader, start, end)
    };
    let mut r = Response::new(body.boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from(end - start),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// One range of `bytes=a-b`, `bytes=a-` or `bytes=-n` over `len` bytes, as `[start, end)`;
/// `None` if it is malformed, names several ranges, or is unsatisfiable.
pub(crate) fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (len.saturating_sub(n), len)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len
        } else {
            b.parse::<u64>().ok()?.checked_add(1)?.min(len)
        };
        (start, end)
    };
    (start < end && start < len).then_some((start, end))
}

/// A response body read from the store in [`READ_CHUNK_BYTES`] chunks, one at a time as hyper
/// asks for the next (so only as fast as the socket takes them).
struct FileBody {
    reader: Box<dyn ObjectReader>,
    pos: u64,
    end: u64,
}

impl FileBody {
    fn new(reader: Box<dyn ObjectReader>, pos: u64, end: u64) -> Self {
        Self { reader, pos, end }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let n = usize::try_from(this.end - this.pos)
            .unwrap_or(usize::MAX)
            .min(READ_CHUNK_BYTES);
        let mut buf = vec![0u8; n];
        let r = tokio::task::block_in_place(|| {
            let mut filled = 0;
            while filled < n {
                match this
                    .reader
                    .read_at(this.pos + filled as u64, &mut buf[filled..])?
                {
                    0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    k => filled += k,
                }
            }
            Ok(())
        });
        Poll::Ready(Some(r.map(|()| {
            this.pos += n as u64;
            Frame::data(Bytes::from(buf))
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 100)));
        assert_eq!(parse_range("bytes=-200", 100), Some((0, 100)));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=-0",
            "bytes=x-",
        ] {
            assert_eq!(parse_range(bad, 100), None, "{bad}");
        }
    }
}
