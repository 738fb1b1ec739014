//! The operator webhook: for deployments with a push relay of their own, each notification of
//! the platforms it serves (`push.webhook.platforms`) is an HTTPS POST of content-free JSON to
//! `push.webhook.url`, signed with HMAC-SHA256 (ring) under a shared secret over the
//! timestamp and the body; the relay then talks to APNs, FCM or the Web Push service itself.
//! Over `push/http.rs` (HTTPS/1.1, keep-alive). See "Operator webhook" in
//! `docs/design/push.md`.
//!
//! - Headers: `Content-Type: application/json`, `Starling-Timestamp: <unix seconds>`,
//!   `Starling-Signature: v1=<lowercase hex HMAC-SHA256(secret, "<timestamp>." ‖ body)>`,
//!   `Starling-Notification-Id: <32 hex>` (the same for every attempt at one device's
//!   notification of one conversation's seq: the relay's key to drop at-least-once repeats).
//! - Body: `{"v":1,"platform":…,"token":…,"app_id":…,"sandbox":…,"conversation_id":"<decimal>",
//!   "seq":N,"unread_count":N,"collapse_key":…}`; never the text or the sender.
//! - Answers: 2xx sent; 404 and 410 the token is invalid (removed); 429, 5xx or no answer
//!   retried (at least `Retry-After`); anything else a dead letter.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use ring::{digest, hmac};
use serde::Serialize;

use super::http::{self, Url};
use super::{Notification, Outcome, Provider};
use crate::config::{WEBHOOK_PLATFORMS, WebhookConfig};
use starling_storage::meta::PushToken;

/// The shortest shared secret accepted, in bytes (HMAC-SHA256's output size).
pub const SECRET_BYTES_MIN: usize = 32;
/// How much of a relay's answer a retry reason or a dead letter keeps.
const REASON_CHARS_MAX: usize = 256;

/// The webhook provider.
pub struct Webhook {
    url: Url,
    key: hmac::Key,
    platforms: Vec<&'static str>,
    http: http::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("platforms", &self.platforms)
            .finish_non_exhaustive()
    }
}

/// The shared secret in a secret file's bytes: a final line ending (and trailing spaces)
/// is not part of it; at least [`SECRET_BYTES_MIN`] bytes remain.
pub fn secret(file: &[u8]) -> Result<&[u8], String> {
    let s = file.trim_ascii_end();
    if s.len() < SECRET_BYTES_MIN {
        return Err(format!(
            "the secret is {} bytes; at least {SECRET_BYTES_MIN} are needed (e.g. `openssl rand -hex 32`)",
            s.len()
        ));
    }
    Ok(s)
}

/// `v1=` and the lowercase hex of HMAC-SHA256(secret, `"<timestamp_s>."` ‖ `body`): the
/// `Starling-Signature` header.
#[must_use]
pub fn signature(key: &hmac::Key, timestamp_s: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp_s.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex(ctx.sign().as_ref()))
}

/// The `Starling-Notification-Id`: 16 bytes of SHA-256 over the token and the
/// conversation's seq, in hex. A retry of the notification (or its repetition after a crash)
/// has the same id; the device's next notification has a higher seq, another id.
#[must_use]
pub fn notification_id(token: &PushToken, n: &Notification) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"starling notification id v1\0");
    ctx.update(token.provider.as_bytes());
    ctx.update(b"\0");
    ctx.update(&(token.token.len() as u64).to_be_bytes());
    ctx.update(&token.token);
    ctx.update(&n.conversation_id.to_be_bytes());
    ctx.update(&n.seq.to_be_bytes());
    hex(&ctx.finish().as_ref()[..16])
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// What the relay receives (members in this order).
#[derive(Serialize)]
struct Body<'a> {
    v: u32,
    platform: &'a str,
    token: &'a str,
    app_id: &'a str,
    sandbox: bool,
    conversation_id: String,
    seq: u64,
    unread_count: u64,
    collapse_key: String,
}

/// The JSON body for `token`: content-free.
pub fn body(token: &PushToken, n: &Notification) -> Result<String, String> {
    let t = std::str::from_utf8(&token.token).map_err(|_| "the stored token is not UTF-8")?;
    serde_json::to_string(&Body {
        v: 1,
        platform: &token.provider,
        token: t,
        app_id: &token.app_id,
        sandbox: token.sandbox,
        conversation_id: n.conversation_id.to_string(),
        seq: n.seq,
        unread_count: n.unread_count,
        collapse_key: n.collapse_key(),
    })
    .map_err(|e| e.to_string())
}

/// The verdict on a relay's answer.
fn classify(r: &http::Response) -> Outcome {
    let mut why = format!("webhook {} ", r.status);
    why.extend(r.body.trim().chars().take(REASON_CHARS_MAX));
    let why = why.trim_end().to_owned();
    match r.status {
        200..=299 => Outcome::Sent,
        404 | 410 => Outcome::InvalidToken(why),
        429 | 500..=599 => Outcome::Retry {
            after_ms: r.retry_after_s.map(|s| s.saturating_mul(1000)),
            why,
        },
        _ => Outcome::Failed(why),
    }
}

impl Webhook {
    /// The provider of `[push.webhook]` (checked by `PushConfig::validate`), reading its
    /// secret file.
    pub fn new(
        cfg: &WebhookConfig,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let path = &cfg.secret_file;
        let what = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("push.webhook.secret_file {}: {e}", path.display())
        };
        let file = std::fs::read(path).map_err(|e| what(&e))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret(&file).map_err(|e| what(&e))?);
        let url = Url::parse(&cfg.url).map_err(|e| anyhow::anyhow!("push.webhook.url: {e}"))?;
        let platforms = WEBHOOK_PLATFORMS
            .into_iter()
            .filter(|p| cfg.platforms.iter().any(|c| c == p))
            .collect();
        Ok(Self {
            url,
            key,
            platforms,
            http: http::Client::new(tls, timeout),
        })
    }
}

impl Provider for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn serves(&self, provider: &str) -> bool {
        self.platforms.contains(&provider)
    }

    fn send(&self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome {
        let body = match body(token, n) {
            Ok(b) => b,
            Err(e) => return Outcome::InvalidToken(e),
        };
        let timestamp_s = now_ms / 1000;
        let headers = [
            ("Content-Type", "application/json".to_owned()),
            ("Starling-Timestamp", timestamp_s.to_string()),
            (
                "Starling-Signature",
                signature(&self.key, timestamp_s, body.as_bytes()),
            ),
            ("Starling-Notification-Id", notification_id(token, n)),
        ];
        // The URL is the operator's: any address.
        match self
            .http
            .post(&self.url, &headers, body.as_bytes(), http::Reach::Any)
        {
            Ok(r) => classify(&r),
            Err(http::PostError::Refused(why) | http::PostError::Failed(why)) => Outcome::Retry {
                after_ms: None,
                why: format!("webhook: {why}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_storage::{DeviceId, UserId};

    fn token(provider: &str, t: &str) -> PushToken {
        PushToken {
            user: UserId(7),
            device: DeviceId(1),
            provider: provider.into(),
            token: t.as_bytes().to_vec(),
            app_id: "org.example.chat".into(),
            sandbox: false,
            updated_ms: starling_storage::TimestampMs(0),
        }
    }

    const N: Notification = Notification {
        conversation_id: 42,
        seq: 9,
        unread_count: 3,
    };

    /// A fixed vector, computed independently (Python's `hmac`):
    /// `hmac.new(b"0123456789abcdef0123456789abcdef", b"1700000000." + body, "sha256")`.
    #[test]
    fn the_signature_is_hmac_sha256_over_the_timestamp_a_dot_and_the_body() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
        let body = br#"{"v":1,"platform":"fcm","token":"t","app_id":"","sandbox":false,"conversation_id":"42","seq":9,"unread_count":3,"collapse_key":"AAAAAAAAAAAAAAAAAAAAKg"}"#;
        assert_eq!(
            signature(&key, 1_700_000_000, body),
            "v1=08ed50f44bc2d4e0f3abbe04317c4abf383d1c0dbfef6535ddc4cc90c4854647"
        );
        // Another timestamp, another signature: a replayed body with a new timestamp fails.
        assert_ne!(
            signature(&key, 1_700_000_001, body),
            signature(&key, 1_700_000_000, body)
        );
    }

    #[test]
    fn the_body_is_content_free_json_in_a_fixed_order() {
        let b = body(&token("fcm", "t"), &N).unwrap();
        assert_eq!(
            b,
            r#"{"v":1,"platform":"fcm","token":"t","app_id":"org.example.chat","sandbox":false,"conversation_id":"42","seq":9,"unread_count":3,"collapse_key":"AAAAAAAAAAAAAAAAAAAAKg"}"#
        );
        assert_eq!(N.collapse_key(), "AAAAAAAAAAAAAAAAAAAAKg");
        let mut bad = token("fcm", "t");
        bad.token = vec![0xff];
        assert_eq!(
            body(&bad, &N),
            Err("the stored token is not UTF-8".to_owned())
        );
    }

    #[test]
    fn the_notification_id_is_stable_per_token_conversation_and_seq() {
        let t = token("apns", &"ab".repeat(32));
        let id = notification_id(&t, &N);
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // The unread count may change between attempts; the id does not.
        let again = Notification {
            unread_count: 1,
            ..N
        };
        assert_eq!(notification_id(&t, &again), id);
        let next = Notification { seq: 10, ..N };
        assert_ne!(notification_id(&t, &next), id);
        let other_conv = Notification {
            conversation_id: 43,
            ..N
        };
        assert_ne!(notification_id(&t, &other_conv), id);
        assert_ne!(notification_id(&token("apns", &"cd".repeat(32)), &N), id);
        assert_ne!(notification_id(&token("fcm", &"ab".repeat(32)), &N), id);
    }

    #[test]
    fn a_secret_shorter_than_32_bytes_is_refused() {
        assert_eq!(secret(&[b'k'; 32]).unwrap().len(), 32);
        let mut line = vec![b'k'; 64];
        line.extend_from_slice(b"\r\n");
        assert_eq!(secret(&line).unwrap(), &line[..64], "the line ending goes");
        let short = [b'k'; 31];
        let err = secret(&short).unwrap_err();
        assert!(err.contains("31 bytes") && err.contains("32"), "{err}");
        let mut padded = vec![b'k'; 31];
        padded.extend_from_slice(b"  \n");
        assert!(secret(&padded).is_err(), "trailing blanks do not count");
    }

    #[test]
    fn answers_are_classified() {
        let r = |status, retry_after_s, body: &str| http::Response {
            status,
            retry_after_s,
            body: body.to_owned(),
        };
        assert_eq!(classify(&r(200, None, "")), Outcome::Sent);
        assert_eq!(classify(&r(202, None, "queued")), Outcome::Sent);
        assert_eq!(
            classify(&r(410, None, "gone")),
            Outcome::InvalidToken("webhook 410 gone".into())
        );
        assert_eq!(
            classify(&r(404, None, "")),
            Outcome::InvalidToken("webhook 404".into())
        );
        assert_eq!(
            classify(&r(503, Some(7), "busy")),
            Outcome::Retry {
                after_ms: Some(7000),
                why: "webhook 503 busy".into()
            }
        );
        assert!(matches!(
            classify(&r(429, None, "")),
            Outcome::Retry { after_ms: None, .. }
        ));
        assert_eq!(
            classify(&r(401, None, "bad signature")),
            Outcome::Failed("webhook 401 bad signature".into())
        );
        assert!(matches!(classify(&r(301, None, "")), Outcome::Failed(_)));
        let Outcome::Failed(long) = classify(&r(400, None, &"x".repeat(10_000))) else {
            panic!()
        };
        assert_eq!(long.len(), "webhook 400 ".len() + REASON_CHARS_MAX);
    }

    #[test]
    fn it_serves_the_configured_platforms_only() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{}\n", "s".repeat(40))).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let cfg = WebhookConfig {
            url: "https://relay.example.org/push".into(),
            secret_file: secret_file.clone(),
            platforms: vec!["web_push".into(), "apns".into()],
        };
        let w = Webhook::new(&cfg, Arc::new(tls.clone()), Duration::from_secs(1)).unwrap();
        assert!(w.serves("apns") && w.serves("web_push"));
        assert!(!w.serves("fcm") && !w.serves("webhook"));
        std::fs::write(&secret_file, "short\n").unwrap();
        let err = Webhook::new(&cfg, Arc::new(tls), Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("push.webhook.secret_file"),
            "{err}"
        );
    }
}
