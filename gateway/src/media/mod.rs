//! The media endpoint: grants for `RequestUpload` and `RequestDownload`, the HTTPS server that
//! takes and serves the bytes ([`http`], on its own threads and tokio runtime, never a shard's),
//! the object store ([`store`]) and the collector of unreferenced uploads.
//!
//! Blobs never travel in frames. A grant is a URL signed with an HMAC-SHA256 key kept in
//! `<data>/keys/media-url-hmac.key` ([`sign`]); the endpoint checks it, streams the bytes to a
//! temporary file while hashing them, and makes the object visible only once its SHA-256
//! matches its id and it is durable. A Send naming an object records, durably and off the
//! shard, that a message references it ([`Media::add_reference`]); objects never referenced are
//! deleted `unreferenced_gc_ms` after their upload.

mod avatars;
pub(crate) mod http;
pub(crate) mod sign;
pub(crate) mod store;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use starling_protocol::v1::{self, ErrorCode};

use crate::accounts::ApiError;
use crate::config::MediaConfig;
use sign::{Grant, Signer};
use store::{FsStore, ObjectStore};

/// Counters of the media endpoint.
#[derive(Debug, Default)]
pub struct MediaStats {
    /// Objects stored (uploads that completed).
    pub uploads: AtomicU64,
    /// Uploads refused or broken off.
    pub uploads_refused: AtomicU64,
    /// Downloads served (200 or 206).
    pub downloads: AtomicU64,
    /// Unreferenced objects the collector deleted.
    pub collected: AtomicU64,
}

/// The media service: configuration, signing key, store.
#[derive(Debug)]
pub struct Media {
    cfg: MediaConfig,
    base_url: String,
    signer: Signer,
    store: Arc<dyn ObjectStore>,
    /// Where profile avatars are recorded ([`avatars`]).
    avatars_dir: std::path::PathBuf,
    /// Counters (also rendered on `/metrics`).
    pub stats: Arc<MediaStats>,
}

impl Media {
    /// Opens the store and key in `data_dir`, binds the endpoint, and starts its threads (the
    /// HTTPS server and the collector). Returns the service and the bound address.
    pub fn start(
        cfg: &MediaConfig,
        data_dir: &Path,
        tls: &Arc<rustls::ServerConfig>,
        stats: Arc<MediaStats>,
    ) -> anyhow::Result<Option<(Arc<Self>, SocketAddr)>> {
        let Some(listen) = cfg.listen else {
            return Ok(None);
        };
        let key = load_or_generate_key(&data_dir.join("keys"))?;
        let store = FsStore::open(&data_dir.join("media"))
            .with_context(|| format!("opening the media store in {}", data_dir.display()))?;
        let avatars_dir = data_dir.join("media").join("avatars");
        crate::fsutil::create_dir_durable(&avatars_dir)?;
        let listener = TcpListener::bind(listen)
            .with_context(|| format!("cannot listen for media on {listen}"))?;
        let addr = listener.local_addr()?;
        let base_url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("https://{addr}"));
        let media = Arc::new(Self {
            cfg: cfg.clone(),
            base_url,
            signer: Signer::new(&key),
            store: Arc::new(store),
            avatars_dir,
            stats,
        });
        let mut tls = (**tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        http::spawn(listener, Arc::new(tls), media.clone())?;
        let gc = media.clone();
        std::thread::Builder::new()
            .name("media-gc".into())
            .spawn(move || gc.collect_forever())
            .context("cannot start the media collector")?;
        Ok(Some((media, addr)))
    }

    /// The base URL of grants.
    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `RequestUpload` → `UploadGrant` (no I/O: it runs on the shard).
    pub fn upload_grant(
        &self,
        req: &v1::RequestUpload,
        now_ms: u64,
    ) -> Result<v1::UploadGrant, ApiError> {
        let sha: [u8; 32] = req.sha256.as_ref().try_into().map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                format!("sha256 must be 32 bytes, got {}", req.sha256.len()),
            )
        })?;
        if req.size_bytes == 0 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "size_bytes must be at least 1",
            ));
        }
        if req.size_bytes > self.cfg.size_bytes_max {
            return Err(ApiError::new(
                ErrorCode::BodyTooLarge,
                format!(
                    "size_bytes {} is over this server's limit of {} bytes",
                    req.size_bytes, self.cfg.size_bytes_max
                ),
            ));
        }
        if !self.allows(&req.content_type) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "content_type {:?} is not accepted; allowed: {}",
                    req.content_type,
                    self.cfg.content_types.join(", ")
                ),
            ));
        }
        let id = hex::encode(sha);
        let exp = now_ms.saturating_add(self.cfg.grant_ttl_ms);
        let grant = Grant::Put {
            size: req.size_bytes,
            content_type: req.content_type.clone(),
        };
        let url = format!(
            "{}{}",
            self.base_url,
            self.signer.path_and_query(&id, &grant, exp)
        );
        Ok(v1::UploadGrant {
            media_id: id,
            upload_url: url,
            method: "PUT".into(),
            headers: [
                ("content-type".to_owned(), req.content_type.clone()),
                ("content-length".to_owned(), req.size_bytes.to_string()),
            ]
            .into_iter()
            .collect(),
            expires_at_ms: exp,
        })
    }

    /// Whether uploads of `content_type` are accepted.
    fn allows(&self, content_type: &str) -> bool {
        self.cfg.content_types.iter().any(|t| t == content_type)
    }

    /// Durably records that a message names `media_id` (blocks: call it on the blocking
    /// pool). `NOT_FOUND` if no such object was uploaded.
    pub fn add_reference(&self, media_id: &str) -> Result<(), ApiError> {
        if !starling_router::is_media_id(media_id) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "media.media_id must be 64 lowercase hex characters (from UploadGrant)",
            ));
        }
        match self.store.add_reference(media_id) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::new(
                ErrorCode::NotFound,
                format!(
                    "media {media_id} was not uploaded to this server (or was collected): \
                     upload it with an UploadGrant first"
                ),
            )),
            Err(e) => {
                tracing::error!(error = %e, media_id, "recording a media reference failed");
                Err(ApiError::new(
                    ErrorCode::Internal,
                    "the media store failed; retry later",
                ))
            }
        }
    }

    /// The collector: every quarter of `unreferenced_gc_ms` (at least 250 ms, at most a minute),
    /// deletes what is older than it and unreferenced.
    fn collect_forever(&self) {
        let every = (self.cfg.unreferenced_gc_ms / 4).clamp(250, 60_000);
        loop {
            std::thread::sleep(crate::clock::ms(every));
            match self
                .store
                .collect(store::cutoff(self.cfg.unreferenced_gc_ms))
            {
                Ok(c) => {
                    self.stats.collected.fetch_add(c.objects, Ordering::Relaxed);
                    if c.objects + c.partial > 0 {
                        tracing::info!(
                            objects = c.objects,
                            partial = c.partial,
                            "media collector removed unreferenced uploads"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "media collection failed"),
            }
        }
    }
}

/// Signs download grants for the router (`RequestDownload`).
#[derive(Debug)]
pub struct DownloadUrls(pub Arc<Media>);

impl starling_router::DownloadSigner for DownloadUrls {
    fn download_grant(&self, media_id: &str, now_ms: u64) -> v1::DownloadGrant {
        let m = &self.0;
        let exp = now_ms.saturating_add(m.cfg.grant_ttl_ms);
        v1::DownloadGrant {
            media_id: media_id.to_owned(),
            download_url: format!(
                "{}{}",
                m.base_url,
                m.signer.path_and_query(media_id, &Grant::Get, exp)
            ),
            expires_at_ms: exp,
        }
    }
}

/// The URL-signing key, 32 random bytes, generated on first start.
fn load_or_generate_key(dir: &Path) -> anyhow::Result<Vec<u8>> {
    crate::fsutil::create_dir_durable(dir)?;
    let path = dir.join("media-url-hmac.key");
    if !path.exists() {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| anyhow::anyhow!("generating the media URL key"))?;
        crate::fsutil::write_atomic(&path, &key, 0o600)?;
    }
    let key = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        key.len() == 32,
        "{} must hold 32 bytes, has {}",
        path.display(),
        key.len()
    );
    Ok(key)
}
