//! APNs: a notification is `POST /3/device/<token>` over HTTP/2 (ALPN `h2`; APNs speaks
//! nothing else) to the production or, for a token registered with `sandbox`, the development
//! endpoint, authenticated with a provider token: an ES256 JWT (`iss` the team id, `iat`;
//! header `kid` the key id) signed with the account's `.p8` key, reused for 50 minutes and
//! never renewed more often than every 20 (APNs refuses faster renewals with
//! `TooManyProviderTokenUpdates`).
//!
//! hyper's HTTP/2 client runs on a tokio runtime of this provider's own (one worker thread,
//! `starling-apns`, which drives the connections); the notifier's thread waits on it for each
//! answer. One persistent connection per endpoint, reopened when it closes.
//!
//! The notification is an alert (`apns-push-type: alert`, priority 10) with
//! `mutable-content: 1` and a localizable placeholder text: the app's notification service
//! extension fetches and decrypts the conversation's latest entries and replaces it. A
//! background push (`content-available`) would be throttled by iOS to a few an hour and never
//! reach a force-quit app.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::http::Url;
use super::{Notification, Outcome, Provider};
use crate::config::ApnsConfig;
use starling_storage::meta::PushToken;

/// A provider token is renewed once it is this old (APNs refuses one older than an hour).
const JWT_REFRESH_MS: u64 = 50 * 60 * 1000;
/// A provider token is never renewed before it is this old.
const JWT_MIN_AGE_MS: u64 = 20 * 60 * 1000;
/// Bytes of an answer's body read at most.
const RESPONSE_BYTES_MAX: usize = 16 * 1024;
/// Notifications one sender hands to APNs at once (concurrent streams; APNs allows far more
/// per connection).
const BATCH_MAX: usize = 64;
/// The alert's localization key (the app's `Localizable.strings` says what it reads).
pub const ALERT_LOC_KEY: &str = "STARLING_NEW_MESSAGES";

/// A lock whose holder cannot have left the data half-written (no panicking code runs under
/// it): a poisoned one is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The provider token and when it was signed.
#[derive(Debug, Clone)]
struct Jwt {
    token: String,
    issued_ms: u64,
    /// APNs said it expired: renew it as soon as [`JWT_MIN_AGE_MS`] allows.
    stale: bool,
}

/// The open connection per endpoint (`true`: sandbox) and its generation.
type Conns = HashMap<bool, (u64, SendRequest<Full<Bytes>>)>;

/// The APNs provider.
pub struct Apns {
    key: EcdsaKeyPair,
    team_id: String,
    key_id: String,
    production: Url,
    sandbox: Url,
    ttl_s: u32,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    rng: SystemRandom,
    jwt: Mutex<Option<Jwt>>,
    rt: tokio::runtime::Runtime,
    /// One HTTP/2 connection per endpoint (`true`: sandbox), shared by the sender threads:
    /// their requests are streams multiplexed on it. The lock is held while a connection is
    /// opened, so concurrent senders wait for it rather than open their own.
    conns: Mutex<Conns>,
    /// Connections opened (a metric of reuse, for tests and logs; also each connection's
    /// generation).
    connections_opened: AtomicU64,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("production", &self.production)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl Apns {
    /// The provider of `[push.apns]`, checking APNs' certificates with the roots of `tls`; its
    /// connection thread runs at `priority`.
    pub fn new(
        cfg: &ApnsConfig,
        tls: &rustls::ClientConfig,
        timeout: Duration,
        priority: crate::config::ThreadPriority,
    ) -> anyhow::Result<Self> {
        let path = &cfg.key_file;
        let what = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("push.apns.key_file {}: {e}", path.display())
        };
        let bytes = std::fs::read(path).map_err(|e| what(&e))?;
        let der = super::webpush::pkcs8(&bytes).map_err(|e| what(&e))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            .map_err(|e| what(&format!("not a P-256 PKCS#8 key ({e})")))?;
        let production =
            Url::parse(&cfg.endpoint).map_err(|e| anyhow::anyhow!("push.apns.endpoint: {e}"))?;
        let sandbox = Url::parse(&cfg.sandbox_endpoint)
            .map_err(|e| anyhow::anyhow!("push.apns.sandbox_endpoint: {e}"))?;
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("starling-apns")
            .on_thread_start(move || super::notifier::background(priority))
            .enable_io()
            .enable_time()
            .build()?;
        Ok(Self {
            key,
            team_id: cfg.team_id.clone(),
            key_id: cfg.key_id.clone(),
            production,
            sandbox,
            ttl_s: cfg.ttl_s,
            tls: Arc::new(tls),
            timeout,
            rng,
            jwt: Mutex::new(None),
            rt,
            conns: Mutex::new(HashMap::new()),
            connections_opened: AtomicU64::new(0),
        })
    }

    /// The provider token to send with, renewed when it is 50 minutes old, or when APNs said
    /// it expired and it is at least 20 minutes old.
    fn provider_token(&self, now_ms: u64) -> Result<String, String> {
        let mut jwt = lock(&self.jwt);
        if let Some(j) = &*jwt {
            let age = now_ms.saturating_sub(j.issued_ms);
            let renew = age >= JWT_REFRESH_MS || (j.stale && age >= JWT_MIN_AGE_MS);
            if !renew {
                return Ok(j.token.clone());
            }
        }
        let iat = now_ms / 1000;
        let header = serde_json::json!({ "alg": "ES256", "kid": self.key_id });
        let claims = serde_json::json!({ "iss": self.team_id, "iat": iat });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| "signing the APNs provider token failed".to_owned())?;
        let token = format!("{input}.{}", b64(sig.as_ref()));
        *jwt = Some(Jwt {
            token: token.clone(),
            issued_ms: now_ms,
            stale: false,
        });
        Ok(token)
    }

    /// The JSON payload: a placeholder alert the app replaces, and the content-free fields.
    #[must_use]
    pub fn payload(n: &Notification) -> String {
        serde_json::json!({
            "aps": {
                "alert": { "loc-key": ALERT_LOC_KEY },
                "mutable-content": 1,
                "thread-id": n.collapse_key(),
            },
            "v": 1,
            "conversation_id": n.conversation_id.to_string(),
            "seq": n.seq,
            "unread_count": n.unread_count,
        })
        .to_string()
    }

    /// The connection to `sandbox`'s endpoint: the open one, or a new one.
    async fn connection(
        tls: Arc<rustls::ClientConfig>,
        url: &Url,
    ) -> Result<SendRequest<Full<Bytes>>, String> {
        let origin = url.origin();
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connecting to {origin}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{origin}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {origin}: {e}"))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(format!("{origin} did not agree to HTTP/2 (ALPN h2)"));
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 with {origin}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::info!(error = %e, "APNs connection closed");
            }
        });
        Ok(sender)
    }

    /// The connection to an endpoint (`sandbox`): the open one, or a new one opened under the
    /// lock (so concurrent senders never open two); its generation, and whether it was
    /// already open.
    fn connection_for(
        &self,
        sandbox: bool,
    ) -> Result<(u64, SendRequest<Full<Bytes>>, bool), String> {
        let timeout = self.timeout;
        let mut conns = lock(&self.conns);
        if let Some((g, s)) = conns.get(&sandbox).filter(|(_, s)| !s.is_closed()) {
            return Ok((*g, s.clone(), true));
        }
        let url = if sandbox {
            self.sandbox.clone()
        } else {
            self.production.clone()
        };
        let tls = self.tls.clone();
        let s = self.rt.block_on(async move {
            tokio::time::timeout(timeout, Self::connection(tls, &url))
                .await
                .unwrap_or_else(|_| Err(format!("no connection within {timeout:?}")))
        })?;
        let g = self.connections_opened.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(sandbox, opened = g, "APNs connection opened");
        conns.insert(sandbox, (g, s.clone()));
        Ok((g, s, false))
    }

    /// Forgets connection `generation` of an endpoint after a failed request (it may be
    /// broken: the next request opens a new one), unless another sender already has.
    fn forget_connection(&self, sandbox: bool, generation: u64) {
        let mut conns = lock(&self.conns);
        if conns.get(&sandbox).is_some_and(|(g, _)| *g == generation) {
            conns.remove(&sandbox);
        }
    }

    /// One request on `sender` within `timeout`: the status, `Retry-After` (s) and body.
    async fn exchange(
        mut sender: SendRequest<Full<Bytes>>,
        req: http::Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(u16, Option<u64>, String), String> {
        let work = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("APNs connection: {e}"))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("APNs request: {e}"))?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            let body = Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| format!("APNs answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((
                status,
                retry_after,
                String::from_utf8_lossy(&body).into_owned(),
            ))
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    /// Posts one notification; the status, `Retry-After` (s) and body, or why there is none
    /// and whether it failed on a connection that was already open (which APNs may have
    /// closed meanwhile: worth one more try on a new one). Concurrent calls share the
    /// endpoint's connection, each request a stream of its own.
    fn post(
        &self,
        sandbox: bool,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Option<u64>, String), (String, bool)> {
        let (generation, sender, reused) =
            self.connection_for(sandbox).map_err(|why| (why, false))?;
        let answer = self.rt.block_on(Self::exchange(sender, req, self.timeout));
        if answer.is_err() {
            self.forget_connection(sandbox, generation);
        }
        answer.map_err(|why| (why, reused))
    }

    /// The request for one notification (to the endpoint of the token's environment).
    fn request(
        &self,
        token: &PushToken,
        n: &Notification,
        jwt: &str,
        now_ms: u64,
    ) -> Result<http::Request<Full<Bytes>>, Outcome> {
        let Ok(device) = std::str::from_utf8(&token.token) else {
            return Err(Outcome::InvalidToken(
                "the stored token is not UTF-8".into(),
            ));
        };
        let url = if token.sandbox {
            &self.sandbox
        } else {
            &self.production
        };
        let expiration = if self.ttl_s == 0 {
            0
        } else {
            now_ms / 1000 + u64::from(self.ttl_s)
        };
        http::Request::post(format!("{}/3/device/{device}", url.origin()))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &token.app_id)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", expiration.to_string())
            .header("apns-collapse-id", n.collapse_key())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(Self::payload(n))))
            .map_err(|e| Outcome::Failed(format!("APNs request: {e}")))
    }

    /// What an APNs answer means.
    fn verdict(&self, status: u16, retry_after_s: Option<u64>, body: &str) -> Outcome {
        let reason = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let why = format!("{status} {reason}").trim().to_owned();
        match (status, reason.as_str()) {
            (200, _) => Outcome::Sent,
            (410, _) | (400, "BadDeviceToken" | "Unregistered") => Outcome::InvalidToken(why),
            (403, "ExpiredProviderToken") => {
                if let Some(j) = &mut *lock(&self.jwt) {
                    j.stale = true;
                }
                Outcome::Retry {
                    after_ms: None,
                    why,
                }
            }
            (429 | 500..=599, _) => Outcome::Retry {
                after_ms: retry_after_s.map(|s| s.saturating_mul(1000)),
                why,
            },
            _ => Outcome::Failed(why),
        }
    }
}

impl Provider for Apns {
    fn name(&self) -> &'static str {
        "apns"
    }

    fn send(&self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome {
        let jwt = match self.provider_token(now_ms) {
            Ok(j) => j,
            Err(why) => return Outcome::Failed(why),
        };
        let mut answer = match self.request(token, n, &jwt, now_ms) {
            Ok(req) => self.post(token.sandbox, req),
            Err(o) => return o,
        };
        if let Err((why, true)) = &answer {
            tracing::info!(%why, "APNs connection lost: sending again on a new one");
            answer = match self.request(token, n, &jwt, now_ms) {
                Ok(req) => self.post(token.sandbox, req),
                Err(o) => return o,
            };
        }
        match answer {
            Ok((status, retry_after, body)) => self.verdict(status, retry_after, &body),
            Err((why, _)) => Outcome::Retry {
                after_ms: None,
                why,
            },
        }
    }

    fn batch_max(&self) -> usize {
        BATCH_MAX
    }

    /// The batch's requests go out at once, as concurrent streams of the endpoints'
    /// connections, driven by the provider's runtime; the calling thread waits for them all.
    /// One that failed on a connection that was already open is sent again on its own.
    fn send_batch(&self, batch: &[(&PushToken, &Notification)], now_ms: u64) -> Vec<Outcome> {
        let jwt = match self.provider_token(now_ms) {
            Ok(j) => j,
            Err(why) => return vec![Outcome::Failed(why); batch.len()],
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut started = Vec::new();
        for (i, (token, n)) in batch.iter().enumerate() {
            let req = match self.request(token, n, &jwt, now_ms) {
                Ok(r) => r,
                Err(o) => {
                    outcomes[i] = Some(o);
                    continue;
                }
            };
            match self.connection_for(token.sandbox) {
                Ok((generation, sender, reused)) => {
                    let task = self.rt.spawn(Self::exchange(sender, req, self.timeout));
                    started.push((i, generation, reused, task));
                }
                Err(why) => {
                    outcomes[i] = Some(Outcome::Retry {
                        after_ms: None,
                        why,
                    });
                }
            }
        }
        let answers = self.rt.block_on(async move {
            let mut answers = Vec::with_capacity(started.len());
            for (i, generation, reused, task) in started {
                let a = task
                    .await
                    .unwrap_or_else(|e| Err(format!("APNs request task: {e}")));
                answers.push((i, generation, reused, a));
            }
            answers
        });
        for (i, generation, reused, answer) in answers {
            let (token, n) = batch[i];
            outcomes[i] = Some(match answer {
                Ok((status, retry_after, body)) => self.verdict(status, retry_after, &body),
                Err(why) => {
                    self.forget_connection(token.sandbox, generation);
                    if reused {
                        tracing::info!(%why, "APNs connection lost: sending again on a new one");
                        self.send(token, n, now_ms)
                    } else {
                        Outcome::Retry {
                            after_ms: None,
                            why,
                        }
                    }
                }
            });
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed("not sent".into())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(dir: &std::path::Path) -> Apns {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let key_file = dir.join("AuthKey.p8");
        std::fs::write(&key_file, pem).unwrap();
        let cfg = ApnsConfig {
            team_id: "TEAM123456".into(),
            key_id: "KEY1234567".into(),
            key_file,
            endpoint: "https://127.0.0.1:1".into(),
            sandbox_endpoint: "https://127.0.0.1:2".into(),
            ttl_s: 60,
        };
        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Apns::new(
            &cfg,
            &tls,
            Duration::from_secs(1),
            crate::config::ThreadPriority::Normal,
        )
        .unwrap()
    }

    #[test]
    fn the_provider_token_lives_50_minutes_and_is_never_renewed_within_20() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        let t0 = 1_000_000_000_000;
        let a = p.provider_token(t0).unwrap();
        assert_eq!(p.provider_token(t0 + 49 * 60_000).unwrap(), a, "reused");
        // APNs says it expired, but it is younger than 20 minutes: kept, retried later.
        assert!(matches!(
            p.verdict(403, None, r#"{"reason":"ExpiredProviderToken"}"#),
            Outcome::Retry { .. }
        ));
        let kept = p.provider_token(t0 + 60_000);
        assert_eq!(kept.unwrap(), a);
        let b = p.provider_token(t0 + 21 * 60_000).unwrap();
        assert_ne!(
            b, a,
            "renewed after ExpiredProviderToken once 20 minutes old"
        );
        let t1 = t0 + 21 * 60_000;
        assert_eq!(p.provider_token(t1 + 49 * 60_000).unwrap(), b);
        assert_ne!(p.provider_token(t1 + 50 * 60_000).unwrap(), b, "50 minutes");
        let (input, _) = b.rsplit_once('.').unwrap();
        let (h, c) = input.split_once('.').unwrap();
        let dec = |s: &str| -> serde_json::Value {
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(s)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            dec(h),
            serde_json::json!({"alg":"ES256","kid":"KEY1234567"})
        );
        assert_eq!(
            dec(c),
            serde_json::json!({"iss":"TEAM123456","iat": t1 / 1000})
        );
    }

    #[test]
    fn answers_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        assert_eq!(p.verdict(200, None, ""), Outcome::Sent);
        for (status, body) in [
            (410, r#"{"reason":"Unregistered","timestamp":1}"#),
            (400, r#"{"reason":"BadDeviceToken"}"#),
            (400, r#"{"reason":"Unregistered"}"#),
        ] {
            assert!(
                matches!(p.verdict(status, None, body), Outcome::InvalidToken(_)),
                "{status} {body}"
            );
        }
        assert_eq!(
            p.verdict(429, Some(3), r#"{"reason":"TooManyRequests"}"#),
            Outcome::Retry {
                after_ms: Some(3000),
                why: "429 TooManyRequests".into()
            }
        );
        assert!(matches!(p.verdict(503, None, ""), Outcome::Retry { .. }));
        for (status, body) in [
            (400, r#"{"reason":"BadTopic"}"#),
            (403, r#"{"reason":"InvalidProviderToken"}"#),
            (413, r#"{"reason":"PayloadTooLarge"}"#),
        ] {
            assert!(
                matches!(p.verdict(status, None, body), Outcome::Failed(_)),
                "{status} {body}"
            );
        }
        let payload = Apns::payload(&Notification {
            conversation_id: 7,
            seq: 3,
            unread_count: 2,
        });
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(v["aps"]["mutable-content"], 1);
        assert_eq!(v["aps"]["alert"]["loc-key"], ALERT_LOC_KEY);
        assert_eq!(
            (v["conversation_id"].as_str(), v["seq"].as_u64()),
            (Some("7"), Some(3))
        );
    }

    #[test]
    fn no_answer_is_retried_and_no_connection_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path());
        let token = PushToken {
            user: starling_storage::UserId(1),
            device: starling_storage::DeviceId(1),
            provider: "apns".into(),
            token: b"00ff".to_vec(),
            app_id: "org.example.chat".into(),
            sandbox: false,
            updated_ms: starling_storage::TimestampMs(0),
        };
        let n = Notification {
            conversation_id: 1,
            seq: 1,
            unread_count: 1,
        };
        assert!(matches!(
            p.send(&token, &n, 1_000_000),
            Outcome::Retry { .. }
        ));
        assert!(lock(&p.conns).is_empty());
    }
}
