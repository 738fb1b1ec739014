//! `[push]`: the push notifier (`crate::push`): its outbox, collapse and retry settings and
//! its providers. No provider configured: no notifier runs and no notice is kept (push tokens
//! are still registered and stored).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, ThreadPriority};

/// `[push]` (see `docs/design/push.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// How long an entry may stay undelivered to a device (no DeliveryAck from it) before the
    /// device is notified, in ms. A device that acknowledges within it gets no notification.
    pub grace_ms: u64,
    /// One notification per device per conversation per this interval, in ms: entries that
    /// arrive meanwhile are collapsed into the next one, sent when it ends.
    pub collapse_ms: u64,
    /// Most rows of the durable outbox (one per device and conversation, pending or within its
    /// collapse interval). Full: a notice for a device and conversation without a row is
    /// dropped and counted (`starling_push_outbox_full_dropped_total`); rows present still
    /// collapse new entries.
    pub outbox_entries_max: usize,
    /// Most notices waiting between the shards and the notifier. Full: a shard drops the
    /// notice (it never waits) and counts it (`starling_push_queue_full_dropped_total`).
    pub queue_notices_max: usize,
    /// First retry delay after a 429 or 5xx, in ms; doubled per attempt (with full jitter) up
    /// to `retry_max_ms`. A `Retry-After` longer than the delay wins.
    pub retry_base_ms: u64,
    /// Longest retry delay, in ms.
    pub retry_max_ms: u64,
    /// Attempts before a notification goes to the dead letters.
    pub attempts_max: u32,
    /// Timeout of one request to a push service (connect, write, read), in ms.
    pub request_timeout_ms: u64,
    /// Sender threads: notifications in flight at once (each sender waits for its push
    /// service's answer; a slow service holds only its own requests).
    pub senders: usize,
    /// The scheduling priority of the notifier, its senders and the APNs connection thread:
    /// `idle` (`SCHED_IDLE`, the default: a waking shard preempts them at once), `low`
    /// (nice 19) or `normal`.
    pub priority: ThreadPriority,
    /// Most notifications handed to the senders and not answered yet (APNs carries up to 64
    /// per sender as concurrent HTTP/2 streams; the other providers one per sender).
    pub in_flight_max: usize,
    /// The CA certificates (PEM) push services' TLS certificates are checked against.
    pub ca_file: PathBuf,
    /// Web Push (RFC 8030, VAPID RFC 8292, aes128gcm RFC 8291); off if absent.
    pub web_push: Option<WebPushConfig>,
    /// Firebase Cloud Messaging (HTTP v1); off if absent.
    pub fcm: Option<FcmConfig>,
    /// Apple Push Notification service (HTTP/2, token-based auth); off if absent.
    pub apns: Option<ApnsConfig>,
    /// The operator's own relay: a signed HTTPS POST of JSON per notification, for the
    /// platforms it names; off if absent.
    pub webhook: Option<WebhookConfig>,
}

/// The token platforms (`PushToken::provider`) a deployment may route through its relay.
pub const WEBHOOK_PLATFORMS: [&str; 3] = ["apns", "fcm", "web_push"];

/// `[push.webhook]`: an HTTPS POST of the notification as JSON, signed with HMAC-SHA256 over
/// a timestamp and the body, to a relay of the operator's (which then talks to the push
/// services itself). See "Operator webhook" in `docs/design/push.md`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The relay's URL; `https://` only (the body carries device tokens; a relay on a private
    /// network uses a certificate whose CA is in `push.ca_file`).
    pub url: String,
    /// The shared secret: the file's bytes, a final line ending (and any trailing spaces)
    /// removed, at least 32 bytes (e.g. `openssl rand -hex 32`).
    pub secret_file: PathBuf,
    /// The token platforms the relay serves: some of "apns", "fcm", "web_push" (all three
    /// by default). A platform it serves may not have a built-in provider configured too.
    #[serde(default = "default_webhook_platforms")]
    pub platforms: Vec<String>,
}

fn default_webhook_platforms() -> Vec<String> {
    WEBHOOK_PLATFORMS.iter().map(|&p| p.to_owned()).collect()
}

/// `[push.apns]`: token-based authentication with a signing key of the Apple developer
/// account (Certificates, Identifiers & Profiles → Keys → Apple Push Notifications service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// The team id (10 characters, the provider JWT's `iss`).
    pub team_id: String,
    /// The key's id (10 characters, the provider JWT's `kid`).
    pub key_id: String,
    /// The `.p8` file Apple hands out for the key: a P-256 key in PKCS#8, PEM.
    pub key_file: PathBuf,
    /// The production APNs base URL (tokens registered without `sandbox`).
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
    /// The development APNs base URL (tokens registered with `sandbox`).
    #[serde(default = "default_apns_sandbox_endpoint")]
    pub sandbox_endpoint: String,
    /// How long APNs keeps an undelivered notification (`apns-expiration` = now + this), in
    /// seconds; 0: delivered only if the device is reachable at once.
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u32,
}

fn default_apns_endpoint() -> String {
    "https://api.push.apple.com".to_owned()
}

fn default_apns_sandbox_endpoint() -> String {
    "https://api.sandbox.push.apple.com".to_owned()
}

/// `[push.fcm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// The service account's JSON key file (Firebase console → Project settings → Service
    /// accounts → Generate new private key): `project_id`, `client_email`, `private_key`
    /// (RSA, PKCS#8 PEM), `private_key_id`, `token_uri` are used.
    pub service_account_file: PathBuf,
    /// The FCM API's base URL.
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    /// The OAuth2 token endpoint, instead of the key file's `token_uri`.
    #[serde(default)]
    pub token_uri: Option<String>,
}

fn default_fcm_endpoint() -> String {
    "https://fcm.googleapis.com".to_owned()
}

/// `[push.web_push]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebPushConfig {
    /// The VAPID key pair's private key: a P-256 key in PKCS#8, PEM (`-----BEGIN PRIVATE
    /// KEY-----`), e.g. `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`.
    /// Its public key is the application server key the web app subscribes with.
    pub vapid_private_key_file: PathBuf,
    /// The VAPID `sub` claim: a `mailto:` or `https:` contact for the push service's operator.
    pub vapid_subject: String,
    /// How long the push service keeps an undelivered notification (`TTL`), in seconds.
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u32,
    /// Send to subscription endpoints on loopback, private, link-local or CGNAT addresses.
    /// Off by default: the endpoint comes from a client, and the server would otherwise POST
    /// wherever a client points it inside the operator's network (such a subscription's token
    /// is removed instead). Only for tests and closed networks with their own push service.
    #[serde(default)]
    pub dangerous_allow_private_endpoints: bool,
}

fn default_ttl_s() -> u32 {
    86_400
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            grace_ms: 2_000,
            collapse_ms: 60_000,
            outbox_entries_max: 1_000_000,
            queue_notices_max: 65_536,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            attempts_max: 10,
            request_timeout_ms: 10_000,
            senders: 64,
            priority: ThreadPriority::Idle,
            in_flight_max: 1024,
            ca_file: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            web_push: None,
            fcm: None,
            apns: None,
            webhook: None,
        }
    }
}

impl PushConfig {
    /// Whether a provider is configured (then the notifier runs).
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.web_push.is_some()
            || self.fcm.is_some()
            || self.apns.is_some()
            || self.webhook.is_some()
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if !(50..=3_600_000).contains(&self.grace_ms) {
            return bad("push.grace_ms", "must be between 50 and 3600000");
        }
        if self.collapse_ms > 86_400_000 {
            return bad("push.collapse_ms", "at most 86400000 (a day)");
        }
        if !(1..=100_000_000).contains(&self.outbox_entries_max) {
            return bad("push.outbox_entries_max", "must be between 1 and 100000000");
        }
        if !(1..=10_000_000).contains(&self.queue_notices_max) {
            return bad("push.queue_notices_max", "must be between 1 and 10000000");
        }
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return bad(
                "push.retry_base_ms",
                "must be at least 1 and at most push.retry_max_ms",
            );
        }
        if self.attempts_max == 0 || self.attempts_max > 100 {
            return bad("push.attempts_max", "must be between 1 and 100");
        }
        if !(100..=120_000).contains(&self.request_timeout_ms) {
            return bad("push.request_timeout_ms", "must be between 100 and 120000");
        }
        if !(1..=1024).contains(&self.senders) {
            return bad("push.senders", "must be between 1 and 1024");
        }
        if !(1..=100_000).contains(&self.in_flight_max) {
            return bad("push.in_flight_max", "must be between 1 and 100000");
        }
        if let Some(w) = &self.web_push {
            if !(w.vapid_subject.starts_with("mailto:") || w.vapid_subject.starts_with("https:")) {
                return bad(
                    "push.web_push.vapid_subject",
                    "must be a mailto: or https: URI",
                );
            }
            if w.ttl_s > 28 * 86_400 {
                return bad("push.web_push.ttl_s", "at most 2419200 (28 days)");
            }
        }
        if let Some(f) = &self.fcm {
            if !f.endpoint.starts_with("https://") {
                return bad("push.fcm.endpoint", "must be an https:// URL");
            }
            if f.token_uri
                .as_ref()
                .is_some_and(|t| !t.starts_with("https://"))
            {
                return bad("push.fcm.token_uri", "must be an https:// URL");
            }
        }
        if let Some(a) = &self.apns {
            let id = |s: &str| {
                !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
            };
            if !id(&a.team_id) {
                return bad("push.apns.team_id", "must be the team id (A-Z 0-9)");
            }
            if !id(&a.key_id) {
                return bad("push.apns.key_id", "must be the key id (A-Z 0-9)");
            }
            if !a.endpoint.starts_with("https://") {
                return bad("push.apns.endpoint", "must be an https:// URL");
            }
            if !a.sandbox_endpoint.starts_with("https://") {
                return bad("push.apns.sandbox_endpoint", "must be an https:// URL");
            }
            if a.ttl_s > 28 * 86_400 {
                return bad("push.apns.ttl_s", "at most 2419200 (28 days)");
            }
        }
        if let Some(w) = &self.webhook {
            self.validate_webhook(w)?;
        }
        Ok(())
    }

    fn validate_webhook(&self, w: &WebhookConfig) -> Result<(), ConfigError> {
        let bad = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if let Err(e) = crate::push::http::Url::parse(&w.url) {
            return bad(
                "push.webhook.url",
                format!("must be an https://host[:port][/path] URL ({e})"),
            );
        }
        if w.platforms.is_empty() {
            return bad(
                "push.webhook.platforms",
                "names no platform (leave it out for all three)".to_owned(),
            );
        }
        for (i, p) in w.platforms.iter().enumerate() {
            if !WEBHOOK_PLATFORMS.contains(&p.as_str()) {
                return bad(
                    "push.webhook.platforms",
                    format!("{p:?} is not one of \"apns\", \"fcm\", \"web_push\""),
                );
            }
            if w.platforms[..i].contains(p) {
                return bad("push.webhook.platforms", format!("{p:?} is named twice"));
            }
            let built_in = match p.as_str() {
                "apns" => self.apns.is_some().then_some("[push.apns]"),
                "fcm" => self.fcm.is_some().then_some("[push.fcm]"),
                _ => self.web_push.is_some().then_some("[push.web_push]"),
            };
            if let Some(table) = built_in {
                return bad(
                    "push.webhook.platforms",
                    format!(
                        "{p:?} is also served by {table}: a platform goes through one provider \
                         (remove it from the list or the table)"
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn with_webhook(extra: &str) -> Result<(), String> {
        let toml = format!(
            "[push.webhook]\nsecret_file = \"/s\"\nurl = \"https://relay.example.org/p\"\n{extra}"
        );
        let c = Config::from_toml(&toml).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn webhook_settings_are_checked() {
        with_webhook("").unwrap();
        with_webhook("platforms = [\"fcm\"]\n").unwrap();
        let c = Config::from_toml("[push.webhook]\nsecret_file = \"/s\"\nurl = \"https://r/\"\n")
            .unwrap();
        assert!(c.push.enabled());
        let w = c.push.webhook.unwrap();
        assert_eq!(w.platforms, ["apns", "fcm", "web_push"], "all by default");
        for (extra, names) in [
            ("platforms = []\n", "push.webhook.platforms"),
            ("platforms = [\"gcm\"]\n", "push.webhook.platforms"),
            ("platforms = [\"fcm\", \"fcm\"]\n", "push.webhook.platforms"),
            (
                "platforms = [\"fcm\"]\n[push.fcm]\nservice_account_file = \"/sa.json\"\n",
                "[push.fcm]",
            ),
            (
                "[push.apns]\nteam_id = \"T\"\nkey_id = \"K\"\nkey_file = \"/k.p8\"\n",
                "[push.apns]",
            ),
            (
                "platforms = [\"web_push\"]\n[push.web_push]\nvapid_private_key_file = \"/v\"\n\
                 vapid_subject = \"mailto:o@x.org\"\n",
                "[push.web_push]",
            ),
        ] {
            let err = with_webhook(extra).unwrap_err();
            assert!(err.contains(names), "{extra}: {err}");
            assert!(err.contains("push.webhook.platforms"), "{extra}: {err}");
        }
        // The built-ins and the webhook may share the work, one platform each.
        with_webhook(
            "platforms = [\"apns\", \"web_push\"]\n[push.fcm]\nservice_account_file = \"/sa.json\"\n",
        )
        .unwrap();
        for url in [
            "http://relay.example.org/p",
            "relay.example.org",
            "https://u@relay/",
            "https://relay:port/",
        ] {
            let toml = format!("[push.webhook]\nsecret_file = \"/s\"\nurl = \"{url}\"\n");
            let err = Config::from_toml(&toml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("push.webhook.url"), "{url}: {err}");
        }
        assert!(
            Config::from_toml("[push.webhook]\nurl = \"https://r/\"\n").is_err(),
            "secret_file is required"
        );
    }
}
