//! RegisterPushToken's input, parsed: a device's push token checked against the form its
//! platform gives it, so that the notifier never meets a token it cannot address. What each
//! platform accepts is specified on `RegisterPushToken` in `proto/push.proto`.
//!
//! - APNs: the device token in hex (32 to 100 bytes; stored lower-case); `app_id` (the
//!   `apns-topic`, the app's bundle id) is required; `sandbox` picks the development
//!   environment.
//! - FCM: the registration token (1 to 4,096 characters of `A-Z a-z 0-9 _ : - .`).
//! - Web Push: the browser's `PushSubscription` as JSON: an `https://` `endpoint` and
//!   `keys.p256dh` (an uncompressed P-256 point, base64url) and `keys.auth` (16 bytes,
//!   base64url). Other members (`expirationTime`) are ignored; the subscription is stored
//!   re-serialized with only these three.

use base64::Engine as _;
use starling_protocol::v1::{self, ErrorCode, PushPlatform};

use super::ApiError;

/// The longest token accepted, in bytes (a Web Push subscription is the longest: its
/// endpoint URL is at most [`ENDPOINT_BYTES_MAX`]).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// The longest Web Push endpoint URL accepted.
pub const ENDPOINT_BYTES_MAX: usize = 2048;
/// The longest `app_id` accepted.
pub const APP_ID_BYTES_MAX: usize = 255;
/// APNs device tokens: 32 bytes today; Apple says they may grow, up to 100.
const APNS_TOKEN_BYTES: std::ops::RangeInclusive<usize> = 32..=100;

const _: () = assert!(ENDPOINT_BYTES_MAX + 256 <= TOKEN_BYTES_MAX);

/// A registration that passed every check: what is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidToken {
    /// "apns", "fcm" or "web_push".
    pub provider: &'static str,
    /// The token in its stored form.
    pub token: String,
    /// The app id (may be empty except for APNs).
    pub app_id: String,
    /// APNs sandbox.
    pub sandbox: bool,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, message)
}

/// Checks a RegisterPushToken.
pub fn parse(req: &v1::RegisterPushToken) -> Result<ValidToken, ApiError> {
    let platform = PushPlatform::try_from(req.platform).unwrap_or(PushPlatform::Unspecified);
    if req.token.is_empty() {
        return Err(invalid("token is empty"));
    }
    if req.token.len() > TOKEN_BYTES_MAX {
        return Err(invalid(format!(
            "token is longer than {TOKEN_BYTES_MAX} bytes"
        )));
    }
    if req.app_id.len() > APP_ID_BYTES_MAX
        || !req
            .app_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid(format!(
            "app_id must be at most {APP_ID_BYTES_MAX} characters of A-Z a-z 0-9 . - _"
        )));
    }
    if req.sandbox && platform != PushPlatform::Apns {
        return Err(invalid("sandbox is for APNs only"));
    }
    let (provider, token) = match platform {
        PushPlatform::Unspecified => {
            return Err(invalid("platform must be APNS, FCM or WEB_PUSH"));
        }
        PushPlatform::Apns => {
            if req.app_id.is_empty() {
                return Err(invalid(
                    "app_id (the app's bundle id, the apns-topic) is required for APNs",
                ));
            }
            ("apns", apns(&req.token)?)
        }
        PushPlatform::Fcm => ("fcm", fcm(&req.token)?),
        PushPlatform::WebPush => ("web_push", web_push(&req.token)?),
    };
    Ok(ValidToken {
        provider,
        token,
        app_id: req.app_id.clone(),
        sandbox: req.sandbox,
    })
}

fn apns(token: &str) -> Result<String, ApiError> {
    let bytes = hex::decode(token).map_err(|_| invalid("an APNs token is hex"))?;
    if !APNS_TOKEN_BYTES.contains(&bytes.len()) {
        return Err(invalid(format!(
            "an APNs token is {} to {} bytes",
            APNS_TOKEN_BYTES.start(),
            APNS_TOKEN_BYTES.end()
        )));
    }
    Ok(hex::encode(bytes))
}

fn fcm(token: &str) -> Result<String, ApiError> {
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-' | b'.'))
    {
        return Err(invalid(
            "an FCM registration token is made of A-Z a-z 0-9 _ : - .",
        ));
    }
    Ok(token.to_owned())
}

#[derive(serde::Deserialize)]
struct Subscription {
    endpoint: String,
    keys: SubscriptionKeys,
}

#[derive(serde::Deserialize)]
struct SubscriptionKeys {
    p256dh: String,
    auth: String,
}

/// The subscription's keys, decoded: the user agent's P-256 public key (65 bytes,
/// uncompressed) and its authentication secret (16 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebPushKeys {
    /// The push endpoint (https).
    pub endpoint: String,
    /// `keys.p256dh`.
    pub p256dh: [u8; 65],
    /// `keys.auth`.
    pub auth: [u8; 16],
}

fn b64url(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| invalid(format!("keys.{field} is not base64url")))
}

/// Parses a Web Push subscription (as registered, or as stored).
pub fn web_push_keys(json: &str) -> Result<WebPushKeys, ApiError> {
    let s: Subscription = serde_json::from_str(json).map_err(|e| {
        invalid(format!(
            "a Web Push token is the subscription JSON {{\"endpoint\", \"keys\": {{\"p256dh\", \"auth\"}}}}: {e}"
        ))
    })?;
    let rest = s
        .endpoint
        .strip_prefix("https://")
        .ok_or_else(|| invalid("the subscription's endpoint must be an https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty()
        || s.endpoint.len() > ENDPOINT_BYTES_MAX
        || s.endpoint.bytes().any(|b| !b.is_ascii_graphic())
    {
        return Err(invalid(format!(
            "the subscription's endpoint must be an https:// URL with a host, at most \
             {ENDPOINT_BYTES_MAX} printable ASCII characters"
        )));
    }
    let p256dh: [u8; 65] = b64url("p256dh", &s.keys.p256dh)?
        .try_into()
        .map_err(|_| invalid("keys.p256dh must be an uncompressed P-256 point (65 bytes)"))?;
    if !p256_point_is_valid(&p256dh) {
        return Err(invalid("keys.p256dh is not a point of P-256"));
    }
    let auth: [u8; 16] = b64url("auth", &s.keys.auth)?
        .try_into()
        .map_err(|_| invalid("keys.auth must be 16 bytes"))?;
    Ok(WebPushKeys {
        endpoint: s.endpoint,
        p256dh,
        auth,
    })
}

/// Whether `point` is an uncompressed point on P-256 (ring checks it when agreeing on a key
/// with it; the agreement itself is thrown away).
fn p256_point_is_valid(point: &[u8; 65]) -> bool {
    let rng = ring::rand::SystemRandom::new();
    let Ok(mine) =
        ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng)
    else {
        return false;
    };
    let peer = ring::agreement::UnparsedPublicKey::new(&ring::agreement::ECDH_P256, point);
    ring::agreement::agree_ephemeral(mine, &peer, |_| ()).is_ok()
}

fn web_push(token: &str) -> Result<String, ApiError> {
    let k = web_push_keys(token)?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    Ok(serde_json::json!({
        "endpoint": k.endpoint,
        "keys": { "p256dh": b64(&k.p256dh), "auth": b64(&k.auth) },
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        platform: PushPlatform,
        token: &str,
        app_id: &str,
        sandbox: bool,
    ) -> v1::RegisterPushToken {
        v1::RegisterPushToken {
            platform: platform as i32,
            token: token.into(),
            app_id: app_id.into(),
            sandbox,
        }
    }

    fn user_agent_key() -> String {
        let rng = ring::rand::SystemRandom::new();
        let k = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng)
            .unwrap();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(k.compute_public_key().unwrap().as_ref())
    }

    fn check(r: v1::RegisterPushToken, expect: Result<(&str, &str), &str>) {
        match (parse(&r), expect) {
            (Ok(v), Ok((provider, token))) => {
                assert_eq!((v.provider, v.token.as_str()), (provider, token));
            }
            (Err(e), Err(message)) => {
                assert_eq!(e.code, ErrorCode::InvalidArgument);
                assert!(e.message.contains(message), "{}", e.message);
            }
            (got, want) => panic!("{r:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn apns_tokens_are_hex_of_32_to_100_bytes_with_a_topic() {
        let t = "AB".repeat(32);
        check(
            req(PushPlatform::Apns, &t, "org.x.app", true),
            Ok(("apns", &"ab".repeat(32))),
        );
        check(req(PushPlatform::Apns, &t, "", false), Err("app_id"));
        check(req(PushPlatform::Apns, "zz", "a", false), Err("hex"));
        check(
            req(PushPlatform::Apns, &"ab".repeat(31), "a", false),
            Err("32 to 100 bytes"),
        );
        check(
            req(PushPlatform::Apns, &"ab".repeat(101), "a", false),
            Err("32 to 100 bytes"),
        );
    }

    #[test]
    fn fcm_tokens_are_one_charset_and_bounded() {
        check(
            req(PushPlatform::Fcm, "dX:APA91b-x_y.z", "", false),
            Ok(("fcm", "dX:APA91b-x_y.z")),
        );
        check(req(PushPlatform::Fcm, "a b", "", false), Err("A-Z"));
        check(req(PushPlatform::Fcm, "", "", false), Err("empty"));
        check(
            req(PushPlatform::Fcm, &"a".repeat(4097), "", false),
            Err("longer"),
        );
        check(req(PushPlatform::Fcm, "a", "", true), Err("sandbox"));
        check(req(PushPlatform::Fcm, "a", "bad id!", false), Err("app_id"));
        check(
            req(PushPlatform::Unspecified, "a", "", false),
            Err("platform"),
        );
        let mut r = req(PushPlatform::Fcm, "a", "", false);
        r.platform = 99;
        check(r, Err("platform"));
    }

    #[test]
    fn web_push_subscriptions_are_checked_and_stored_canonical() {
        let key = user_agent_key();
        let auth = "AAECAwQFBgcICQoLDA0ODw";
        let sub = format!(
            r#"{{"endpoint":"https://push.example.net/w/1","expirationTime":null,"keys":{{"auth":"{auth}==","p256dh":"{key}"}}}}"#
        );
        let stored = format!(
            r#"{{"endpoint":"https://push.example.net/w/1","keys":{{"auth":"{auth}","p256dh":"{key}"}}}}"#
        );
        check(
            req(PushPlatform::WebPush, &sub, "", false),
            Ok(("web_push", &stored)),
        );
        let keys = web_push_keys(&stored).unwrap();
        assert_eq!(keys.auth, core::array::from_fn(|i| i as u8));
        let bad = |endpoint: &str, p256dh: &str, auth: &str, why: &str| {
            let sub = format!(
                r#"{{"endpoint":"{endpoint}","keys":{{"p256dh":"{p256dh}","auth":"{auth}"}}}}"#
            );
            check(req(PushPlatform::WebPush, &sub, "", false), Err(why));
        };
        bad("http://push.example.net/w", &key, auth, "https://");
        bad("https:///w", &key, auth, "with a host");
        bad("https://push.example.net/w", "AAAA", auth, "65 bytes");
        bad("https://push.example.net/w", &key, "AAAA", "16 bytes");
        bad("https://push.example.net/w", "!!", auth, "base64url");
        // 65 bytes, but not on the curve.
        let off = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([4u8; 65]);
        bad("https://push.example.net/w", &off, auth, "not a point");
        check(
            req(PushPlatform::WebPush, "not json", "", false),
            Err("subscription JSON"),
        );
    }
}
