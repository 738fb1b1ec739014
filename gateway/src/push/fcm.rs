//! FCM HTTP v1: `POST {endpoint}/v1/projects/{project_id}/messages:send` with an OAuth2 access
//! token, which the service account gets by the JWT-bearer grant (RFC 7523): an RS256 JWT
//! signed with the account's private key, exchanged at its `token_uri`; the token is cached
//! until five minutes before it expires (Google's last an hour), and dropped on a 401.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};

use super::http::{self, Url};
use super::{Notification, Outcome, Provider};
use crate::config::FcmConfig;
use starling_storage::meta::PushToken;

/// The OAuth2 scope of FCM sends.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// A cached access token is renewed this long before it expires.
const TOKEN_MARGIN_MS: u64 = 5 * 60 * 1000;
/// Lifetime asked of the assertion (Google allows at most an hour).
const ASSERTION_TTL_S: u64 = 3600;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The fields of a Google service-account JSON key file that are used.
#[derive(serde::Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    token_uri: String,
}

/// The FCM provider.
pub struct Fcm {
    key: RsaKeyPair,
    key_id: String,
    client_email: String,
    token_url: Url,
    token_uri: String,
    send_url: Url,
    /// The cached access token and when it expires; the lock is held through an exchange,
    /// so concurrent senders wait for one exchange rather than each making one.
    access: std::sync::Mutex<Option<(String, u64)>>,
    http: http::Client,
    rng: SystemRandom,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("client_email", &self.client_email)
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

fn pem_pkcs8(pem: &str) -> anyhow::Result<Vec<u8>> {
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    anyhow::ensure!(
        !b64.is_empty(),
        "private_key has no PRIVATE KEY (PKCS#8) PEM block"
    );
    Ok(base64::engine::general_purpose::STANDARD.decode(b64.trim())?)
}

impl Fcm {
    /// The provider of `[push.fcm]`.
    pub fn new(
        cfg: &FcmConfig,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let path = &cfg.service_account_file;
        let what = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("push.fcm.service_account_file {}: {e}", path.display())
        };
        let text = std::fs::read_to_string(path).map_err(|e| what(&e))?;
        let sa: ServiceAccount = serde_json::from_str(&text).map_err(|e| what(&e))?;
        let der = pem_pkcs8(&sa.private_key).map_err(|e| what(&e))?;
        let key = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| what(&format!("private_key is not an RSA PKCS#8 key ({e})")))?;
        let token_uri = cfg.token_uri.clone().unwrap_or(sa.token_uri);
        let token_url = Url::parse(&token_uri).map_err(|e| what(&e))?;
        let send_url = Url::parse(&format!(
            "{}/v1/projects/{}/messages:send",
            cfg.endpoint.trim_end_matches('/'),
            sa.project_id
        ))
        .map_err(|e| anyhow::anyhow!("push.fcm.endpoint: {e}"))?;
        Ok(Self {
            key,
            key_id: sa.private_key_id,
            client_email: sa.client_email,
            token_url,
            token_uri,
            send_url,
            access: std::sync::Mutex::new(None),
            http: http::Client::new(tls, timeout),
            rng: SystemRandom::new(),
        })
    }

    /// The signed JWT-bearer assertion.
    fn assertion(&self, now_s: u64) -> Result<String, String> {
        let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
        if !self.key_id.is_empty() {
            header["kid"] = self.key_id.clone().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now_s,
            "exp": now_s + ASSERTION_TTL_S,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
            .map_err(|_| "signing the OAuth2 assertion failed".to_owned())?;
        Ok(format!("{input}.{}", b64(&sig)))
    }

    /// A valid access token: the cached one, or a new one from the token endpoint.
    fn access_token(&self, now_ms: u64) -> Result<String, Outcome> {
        let mut access = self
            .access
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((t, exp)) = &*access
            && now_ms + TOKEN_MARGIN_MS < *exp
        {
            return Ok(t.clone());
        }
        let retry = |why: String| Outcome::Retry {
            after_ms: None,
            why,
        };
        let jwt = self.assertion(now_ms / 1000).map_err(Outcome::Failed)?;
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}"
        );
        let headers = [(
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        )];
        let r = self
            .http
            .post(&self.token_url, &headers, body.as_bytes(), http::Reach::Any)
            .map_err(|e| match e {
                http::PostError::Refused(why) | http::PostError::Failed(why) => retry(why),
            })?;
        if r.status != 200 {
            // A refused assertion is the operator's to fix; retried (and dead-lettered after
            // push.attempts_max) rather than dropped.
            return Err(Outcome::Retry {
                after_ms: r.retry_after_s.map(|s| s.saturating_mul(1000)),
                why: format!("token endpoint: {} {}", r.status, r.body.trim()),
            });
        }
        #[derive(serde::Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: u64,
        }
        let g: Granted = serde_json::from_str(&r.body)
            .map_err(|e| retry(format!("token endpoint answer: {e}")))?;
        let exp = now_ms + g.expires_in.saturating_mul(1000);
        *access = Some((g.access_token.clone(), exp));
        Ok(g.access_token)
    }
}

impl Provider for Fcm {
    fn name(&self) -> &'static str {
        "fcm"
    }

    fn send(&self, token: &PushToken, n: &Notification, now_ms: u64) -> Outcome {
        let access = match self.access_token(now_ms) {
            Ok(a) => a,
            Err(o) => return o,
        };
        let Ok(registration) = std::str::from_utf8(&token.token) else {
            return Outcome::InvalidToken("the stored token is not UTF-8".into());
        };
        // FCM data values are strings.
        let body = serde_json::json!({
            "message": {
                "token": registration,
                "data": {
                    "v": "1",
                    "conversation_id": n.conversation_id.to_string(),
                    "seq": n.seq.to_string(),
                    "unread_count": n.unread_count.to_string(),
                },
                "android": { "collapse_key": n.collapse_key(), "priority": "high" },
            }
        })
        .to_string();
        let headers = [
            ("Authorization", format!("Bearer {access}")),
            ("Content-Type", "application/json".to_owned()),
        ];
        let r = match self
            .http
            .post(&self.send_url, &headers, body.as_bytes(), http::Reach::Any)
        {
            Ok(r) => r,
            Err(http::PostError::Refused(why) | http::PostError::Failed(why)) => {
                return Outcome::Retry {
                    after_ms: None,
                    why,
                };
            }
        };
        let why = format!("{} {}", r.status, r.body.trim());
        match r.status {
            200..=299 => Outcome::Sent,
            404 => Outcome::InvalidToken(why),
            _ if r.body.contains("\"UNREGISTERED\"") => Outcome::InvalidToken(why),
            401 => {
                // The access token was refused: get a new one next time (unless another
                // sender already has).
                let mut cached = self
                    .access
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cached.as_ref().is_some_and(|(t, _)| *t == access) {
                    *cached = None;
                }
                Outcome::Retry {
                    after_ms: None,
                    why,
                }
            }
            429 | 500..=599 => Outcome::Retry {
                after_ms: r.retry_after_s.map(|s| s.saturating_mul(1000)),
                why,
            },
            _ => Outcome::Failed(why),
        }
    }
}
