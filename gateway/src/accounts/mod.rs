//! The accounts front door: one-time codes, sign-in, sessions and tokens,
//! profile, devices and contact discovery. Every method here is blocking
//! (store reads and writes, Argon2id) and runs on the bounded blocking pool,
//! never on a shard thread — except [`Accounts::verify_access`], which is
//! pure CPU (an Ed25519 verify) and runs on the shard. Rate limits are in
//! memory, per process.

pub mod sender;
pub mod store;
pub mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use starling_protocol::v1::{self, ErrorCode};

use crate::config::{AccountsConfig, OtpSenderConfig};
use crate::metrics::Metrics;
use sender::OtpSender;
use store::{AccountStore, DeviceRec, OtpOutcome, OtpRec, RotateOutcome, SessionRec, UserRec};
use tokens::{TokenError, TokenKeys};

/// A request failed: what to put in the Error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The wire code.
    pub code: ErrorCode,
    /// Detail for humans.
    pub message: String,
    /// Retry hint.
    pub retry_after_ms: u32,
}

impl ApiError {
    /// An error without retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        tracing::error!(error = %e, "account store failure");
        ApiError::new(ErrorCode::StorageFailure, "account store unavailable")
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who an authenticated connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: u64,
    /// The device.
    pub device_id: u32,
    /// The session.
    pub session_id: u64,
}

impl Principal {
    /// As the wire type.
    #[must_use]
    pub fn to_wire(self) -> v1::AuthenticatedAs {
        v1::AuthenticatedAs {
            user_id: self.user_id,
            device_id: self.device_id,
            session_id: self.session_id,
        }
    }
}

/// A verified access token: who it names and when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Who the token names (its session still has to be checked).
    pub principal: Principal,
    /// Unix ms at which the token stops being valid.
    pub expires_at_ms: u64,
}

/// A granted session plus the principal it authenticates.
#[derive(Debug, Clone)]
pub struct Granted {
    /// For the connection.
    pub principal: Principal,
    /// For the client.
    pub frame: v1::SessionGranted,
}

/// Fixed-window counters keyed by string.
#[derive(Debug, Default)]
struct RateLimiter {
    windows: Mutex<HashMap<String, (u64, u32)>>,
}

impl RateLimiter {
    /// Counts one event for `key`; refuses past `limit` per `window_ms`.
    fn check(&self, key: &str, limit: u32, window_ms: u64, now_ms: u64) -> ApiResult<()> {
        let mut w = self
            .windows
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "rate limiter poisoned"))?;
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| start.saturating_add(window_ms) > now_ms);
        }
        let e = w.entry(key.to_owned()).or_insert((now_ms, 0));
        if e.0.saturating_add(window_ms) <= now_ms {
            *e = (now_ms, 0);
        }
        if e.1 >= limit {
            let retry = e.0.saturating_add(window_ms).saturating_sub(now_ms);
            return Err(ApiError {
                code: ErrorCode::RateLimited,
                message: format!(
                    "too many requests for {}",
                    key.split(':').next().unwrap_or("")
                ),
                retry_after_ms: u32::try_from(retry).unwrap_or(u32::MAX),
            });
        }
        e.1 += 1;
        Ok(())
    }
}

const HOUR_MS: u64 = 3600 * 1000;

/// A normalised identifier.
#[derive(Debug, Clone)]
struct Ident {
    /// `phone:+1...` or `email:a@b`.
    key: String,
    /// The bare value.
    value: String,
    is_phone: bool,
}

fn parse_ident(id: Option<&v1::Identifier>) -> ApiResult<Ident> {
    let bad = |m: &str| ApiError::new(ErrorCode::InvalidArgument, m);
    match id.and_then(|i| i.kind.as_ref()) {
        Some(v1::identifier::Kind::Phone(p)) => {
            let digits = p
                .strip_prefix('+')
                .ok_or_else(|| bad("phone must be E.164 (+digits)"))?;
            if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("phone must be E.164 (+ and 8 to 15 digits)"));
            }
            Ok(Ident {
                key: format!("phone:{p}"),
                value: p.clone(),
                is_phone: true,
            })
        }
        Some(v1::identifier::Kind::Email(e)) => {
            let e = e.trim().to_ascii_lowercase();
            let ok = e.len() <= 254
                && e.split_once('@')
                    .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'));
            if !ok {
                return Err(bad("invalid e-mail address"));
            }
            Ok(Ident {
                key: format!("email:{e}"),
                value: e,
                is_phone: false,
            })
        }
        None => Err(bad("identifier is required")),
    }
}

/// The accounts service (shared by all shards).
#[derive(Debug)]
pub struct Accounts {
    cfg: AccountsConfig,
    store: Box<dyn AccountStore>,
    keys: TokenKeys,
    otp_key: ring::hmac::Key,
    pepper: ring::hmac::Key,
    sender: Box<dyn OtpSender>,
    limiter: RateLimiter,
    rng: ring::rand::SystemRandom,
    metrics: Arc<Metrics>,
}

fn random_bytes<const N: usize>(rng: &ring::rand::SystemRandom) -> ApiResult<[u8; N]> {
    ring::rand::generate::<[u8; N]>(rng)
        .map(ring::rand::Random::expose)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "no randomness"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// Loads a 32-byte secret from `path`, generating it on first start.
fn load_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    if !path.exists() {
        let rng = ring::rand::SystemRandom::new();
        let s: [u8; 32] = ring::rand::generate(&rng)
            .map_err(|_| anyhow::anyhow!("no randomness"))?
            .expose();
        crate::fsutil::write_atomic(path, &s, 0o600)?;
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{} is not a 32-byte secret", path.display()))
}

impl Accounts {
    /// Opens the store and keys under `data_dir`.
    pub fn open(
        data_dir: &Path,
        cfg: AccountsConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let keys_dir = data_dir.join("keys");
        let keys = TokenKeys::load_or_generate(&keys_dir)?;
        let otp_secret = load_secret(&keys_dir.join("otp-hmac.key"))?;
        let pepper = load_secret(&keys_dir.join("contacts-pepper.key"))?;
        let store = store::RedbAccountStore::open(&data_dir.join("accounts.redb"))
            .context("opening the account store")?;
        let sender: Box<dyn OtpSender> = match &cfg.otp_sender {
            OtpSenderConfig::Dev => Box::new(sender::DevFileSender::new(data_dir.join("otp.log"))),
            OtpSenderConfig::Webhook { url } => {
                Box::new(sender::WebhookSender::new(url).map_err(anyhow::Error::msg)?)
            }
        };
        Ok(Self {
            cfg,
            store: Box::new(store),
            keys,
            otp_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &otp_secret),
            pepper: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &pepper),
            sender,
            limiter: RateLimiter::default(),
            rng: ring::rand::SystemRandom::new(),
            metrics,
        })
    }

    /// The access-token key id (printed at start-up).
    #[must_use]
    pub fn token_kid(&self) -> &str {
        self.keys.kid()
    }

    fn fail(&self, reason: &str, e: ApiError) -> ApiError {
        self.metrics.auth_failure(reason);
        e
    }

    fn otp_mac(&self, ident: &Ident, code: &str) -> ring::hmac::Tag {
        ring::hmac::sign(&self.otp_key, format!("{}\n{code}", ident.key).as_bytes())
    }

    fn phone_key(&self, e164: &str) -> Vec<u8> {
        let h = ring::digest::digest(&ring::digest::SHA256, e164.as_bytes());
        self.phone_key_of_hash(h.as_ref())
    }

    fn phone_key_of_hash(&self, sha256: &[u8]) -> Vec<u8> {
        ring::hmac::sign(&self.pepper, sha256).as_ref().to_vec()
    }

    /// RequestOtp.
    pub fn request_otp(
        &self,
        req: &v1::RequestOtp,
        ip: IpAddr,
        now_ms: u64,
    ) -> ApiResult<v1::OtpSent> {
        let ident = parse_ident(req.identifier.as_ref())?;
        let c = &self.cfg;
        self.limiter
            .check(
                &format!("ip:{ip}"),
                c.otp_requests_per_ip_per_hour,
                HOUR_MS,
                now_ms,
            )
            .map_err(|e| self.fail("rate_limited", e))?;
        if let Some(prev) = self.store.otp_get(&ident.key)?
            && prev.sent_at_ms + c.otp_resend_ms > now_ms
            && prev.expires_at_ms > now_ms
        {
            let wait = prev.sent_at_ms + c.otp_resend_ms - now_ms;
            return Err(self.fail(
                "rate_limited",
                ApiError {
                    code: ErrorCode::RateLimited,
                    message: "a code was sent recently".into(),
                    retry_after_ms: u32::try_from(wait).unwrap_or(u32::MAX),
                },
            ));
        }
        self.limiter
            .check(
                &format!("ident:{}", ident.key),
                c.otp_requests_per_identifier_per_hour,
                HOUR_MS,
                now_ms,
            )
            .map_err(|e| self.fail("rate_limited", e))?;
        // Uniform 6 digits: rejection-sample a u32.
        let code = loop {
            let n = u32::from_le_bytes(random_bytes::<4>(&self.rng)?);
            if n < 4_294_000_000 {
                break format!("{:06}", n % 1_000_000);
            }
        };
        let rec = OtpRec {
            mac: hex::encode(self.otp_mac(&ident, &code).as_ref()),
            expires_at_ms: now_ms + c.otp_ttl_ms,
            attempts_left: c.otp_attempts_max,
            sent_at_ms: now_ms,
        };
        self.store.otp_put(&ident.key, &rec)?;
        self.sender.send(&ident.value, &code).map_err(|e| {
            tracing::warn!(error = %e, "otp delivery failed");
            ApiError::new(ErrorCode::Unavailable, "could not deliver the code")
        })?;
        Ok(v1::OtpSent {
            expires_at_ms: rec.expires_at_ms,
            resend_after_ms: u32::try_from(c.otp_resend_ms).unwrap_or(u32::MAX),
            attempts_allowed: c.otp_attempts_max,
        })
    }

    fn check_otp(&self, ident: &Ident, code: &str, now_ms: u64) -> ApiResult<()> {
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            // Still spends an attempt: malformed guesses are guesses.
        }
        let outcome = self.store.otp_consume(&ident.key, now_ms, &|rec| {
            hex::decode(&rec.mac).is_ok_and(|mac| {
                ring::hmac::verify(
                    &self.otp_key,
                    format!("{}\n{code}", ident.key).as_bytes(),
                    &mac,
                )
                .is_ok()
            })
        })?;
        match outcome {
            OtpOutcome::Accepted => Ok(()),
            OtpOutcome::Wrong(0) | OtpOutcome::Exhausted => Err(self.fail(
                "otp_attempts_exceeded",
                ApiError::new(
                    ErrorCode::OtpAttemptsExceeded,
                    "too many wrong codes; request a new one",
                ),
            )),
            OtpOutcome::Wrong(left) => Err(self.fail(
                "otp_invalid",
                ApiError::new(
                    ErrorCode::OtpInvalid,
                    format!("wrong code, {left} attempts left"),
                ),
            )),
            OtpOutcome::Expired => Err(self.fail(
                "otp_expired",
                ApiError::new(ErrorCode::OtpExpired, "no valid code; request one"),
            )),
        }
    }

    fn grant(
        &self,
        user_id: u64,
        device: Option<&v1::DeviceInfo>,
        new_user: bool,
        now_ms: u64,
    ) -> ApiResult<Granted> {
        let d = device.cloned().unwrap_or_default();
        let device_id = self.store.device_create(
            user_id,
            &DeviceRec {
                name: truncate(&d.name, 100),
                platform: truncate(&d.platform, 32),
                created_at_ms: now_ms,
                last_seen_ms: now_ms,
            },
        )?;
        let refresh = self.new_refresh_token()?;
        let refresh_expires_at_ms = now_ms + self.cfg.refresh_token_ttl_ms;
        let session_id = self.store.session_create(&SessionRec {
            user_id,
            device_id,
            created_at_ms: now_ms,
            revoked: false,
            refresh_sha256: sha256_hex(refresh.as_bytes()),
            refresh_expires_at_ms,
        })?;
        let principal = Principal {
            user_id,
            device_id,
            session_id,
        };
        self.tokens_for(principal, refresh, refresh_expires_at_ms, new_user, now_ms)
    }

    fn new_refresh_token(&self) -> ApiResult<String> {
        use base64::Engine as _;
        let raw = random_bytes::<32>(&self.rng)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
    }

    fn tokens_for(
        &self,
        p: Principal,
        refresh: String,
        refresh_exp: u64,
        new_user: bool,
        now_ms: u64,
    ) -> ApiResult<Granted> {
        let (access, access_exp) = self
            .keys
            .issue(
                p.user_id,
                p.device_id,
                p.session_id,
                now_ms,
                self.cfg.access_token_ttl_ms,
            )
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("signing: {e}")))?;
        Ok(Granted {
            principal: p,
            frame: v1::SessionGranted {
                user_id: p.user_id,
                device_id: p.device_id,
                session_id: p.session_id,
                access_token: access,
                access_expires_at_ms: access_exp,
                refresh_token: refresh,
                refresh_expires_at_ms: refresh_exp,
                new_user,
            },
        })
    }

    /// VerifyOtp: registers the user if new; always a new device and session.
    pub fn verify_otp(&self, req: &v1::VerifyOtp, now_ms: u64) -> ApiResult<Granted> {
        let ident = parse_ident(req.identifier.as_ref())?;
        self.check_otp(&ident, &req.code, now_ms)?;
        let name = truncate(req.display_name.trim(), 100);
        let rec = UserRec {
            display_name: name,
            phone: ident.is_phone.then(|| ident.value.clone()),
            email: (!ident.is_phone).then(|| ident.value.clone()),
            created_at_ms: now_ms,
            next_device_id: 1,
            ..UserRec::default()
        };
        let phone_key = ident.is_phone.then(|| self.phone_key(&ident.value));
        let (user_id, created) = self
            .store
            .user_create(&ident.key, &rec, phone_key.as_deref())?;
        self.grant(user_id, req.device.as_ref(), created, now_ms)
    }

    /// Login by OTP or password.
    pub fn login(&self, req: &v1::Login, now_ms: u64) -> ApiResult<Granted> {
        let ident = parse_ident(req.identifier.as_ref())?;
        let bad_credentials = || {
            self.fail(
                "invalid_credentials",
                ApiError::new(
                    ErrorCode::InvalidCredentials,
                    "wrong identifier or password",
                ),
            )
        };
        let user_id = match &req.credential {
            Some(v1::login::Credential::OtpCode(code)) => {
                self.check_otp(&ident, code, now_ms)?;
                self.store.user_by_ident(&ident.key)?.ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::NotFound,
                        "no such user; use VerifyOtp to register",
                    )
                })?
            }
            Some(v1::login::Credential::Password(pw)) => {
                self.limiter
                    .check(&format!("login:{}", ident.key), 20, HOUR_MS, now_ms)
                    .map_err(|e| self.fail("rate_limited", e))?;
                let Some(uid) = self.store.user_by_ident(&ident.key)? else {
                    // Spend the same effort as a real check (no user oracle by timing).
                    let _ = self.hash_password("dummy-password-for-timing");
                    return Err(bad_credentials());
                };
                let user = self.store.user_get(uid)?.ok_or_else(bad_credentials)?;
                let Some(hash) = user.password_hash else {
                    let _ = self.hash_password("dummy-password-for-timing");
                    return Err(bad_credentials());
                };
                if !verify_password(pw, &hash) {
                    return Err(bad_credentials());
                }
                uid
            }
            None => {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "credential is required",
                ));
            }
        };
        self.grant(user_id, req.device.as_ref(), false, now_ms)
    }

    /// Refresh: rotates the refresh token; reuse revokes the session.
    /// On reuse, returns the revoked session id in the error path's second
    /// element so live connections can be closed.
    pub fn refresh(
        &self,
        req: &v1::Refresh,
        now_ms: u64,
    ) -> Result<Granted, (ApiError, Option<u64>)> {
        let old = sha256_hex(req.refresh_token.as_bytes());
        let new = self.new_refresh_token().map_err(|e| (e, None))?;
        let exp = now_ms + self.cfg.refresh_token_ttl_ms;
        let outcome = self
            .store
            .refresh_rotate(&old, &sha256_hex(new.as_bytes()), exp, now_ms)
            .map_err(|e| (e.into(), None))?;
        match outcome {
            RotateOutcome::Rotated(sid, s) => self
                .tokens_for(
                    Principal {
                        user_id: s.user_id,
                        device_id: s.device_id,
                        session_id: sid,
                    },
                    new,
                    exp,
                    false,
                    now_ms,
                )
                .map_err(|e| (e, None)),
            RotateOutcome::Reused(sid) => Err((
                self.fail(
                    "refresh_token_reused",
                    ApiError::new(
                        ErrorCode::RefreshTokenReused,
                        "refresh token reused; session revoked",
                    ),
                ),
                Some(sid),
            )),
            RotateOutcome::Revoked => Err((
                self.fail(
                    "session_revoked",
                    ApiError::new(ErrorCode::SessionRevoked, "session revoked"),
                ),
                None,
            )),
            RotateOutcome::Expired => Err((
                self.fail(
                    "token_expired",
                    ApiError::new(ErrorCode::TokenExpired, "refresh token expired"),
                ),
                None,
            )),
            RotateOutcome::Unknown => Err((
                self.fail(
                    "token_invalid",
                    ApiError::new(ErrorCode::TokenInvalid, "unknown refresh token"),
                ),
                None,
            )),
        }
    }

    /// Checks an access token and its session (blocking: reads the store).
    pub fn authenticate(&self, token: &str, now_ms: u64) -> ApiResult<Principal> {
        let access = self.verify_access(token, now_ms)?;
        self.check_session(&access)
    }

    /// Checks an access token's signature, algorithm, key id, issuer and
    /// expiry. Pure CPU, no store access: shard threads call it directly.
    pub fn verify_access(&self, token: &str, now_ms: u64) -> ApiResult<Access> {
        let claims = self.keys.verify(token, now_ms).map_err(|e| match e {
            TokenError::Expired => self.fail(
                "token_expired",
                ApiError::new(ErrorCode::TokenExpired, "access token expired; refresh it"),
            ),
            TokenError::Invalid => self.fail(
                "token_invalid",
                ApiError::new(ErrorCode::TokenInvalid, "access token invalid"),
            ),
        })?;
        let user_id: u64 = claims.sub.parse().map_err(|_| {
            self.fail(
                "token_invalid",
                ApiError::new(ErrorCode::TokenInvalid, "bad subject"),
            )
        })?;
        Ok(Access {
            principal: Principal {
                user_id,
                device_id: claims.dev,
                session_id: claims.sid,
            },
            expires_at_ms: claims.exp.saturating_mul(1000),
        })
    }

    /// Checks that a verified token's session exists, is not revoked and
    /// belongs to its user and device. Blocking (a store read).
    pub fn check_session(&self, access: &Access) -> ApiResult<Principal> {
        let p = access.principal;
        match self.store.session_get(p.session_id)? {
            Some(s) if !s.revoked && s.user_id == p.user_id && s.device_id == p.device_id => Ok(p),
            _ => Err(self.fail(
                "session_revoked",
                ApiError::new(ErrorCode::SessionRevoked, "session revoked"),
            )),
        }
    }

    /// Logout: revokes `session_id` (0: the caller's). Returns the revoked id.
    pub fn logout(&self, p: Principal, session_id: u64) -> ApiResult<u64> {
        let sid = if session_id == 0 {
            p.session_id
        } else {
            session_id
        };
        match self.store.session_get(sid)? {
            Some(s) if s.user_id == p.user_id => {
                self.store.session_revoke(sid)?;
                Ok(sid)
            }
            _ => Err(ApiError::new(ErrorCode::NotFound, "no such session")),
        }
    }

    fn user(&self, p: Principal) -> ApiResult<UserRec> {
        self.store
            .user_get(p.user_id)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "user not found"))
    }

    /// GetMe.
    pub fn get_me(&self, p: Principal) -> ApiResult<v1::Profile> {
        Ok(own_profile(p.user_id, &self.user(p)?))
    }

    /// UpdateProfile.
    pub fn update_profile(&self, p: Principal, req: &v1::UpdateProfile) -> ApiResult<v1::Profile> {
        let mut u = self.user(p)?;
        if let Some(n) = &req.display_name {
            if n.chars().count() > 100 {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "display_name: at most 100 characters",
                ));
            }
            u.display_name = n.trim().to_owned();
        }
        if let Some(a) = &req.about {
            if a.chars().count() > 500 {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "about: at most 500 characters",
                ));
            }
            a.clone_into(&mut u.about);
        }
        self.store.user_put(p.user_id, &u)?;
        Ok(own_profile(p.user_id, &u))
    }

    /// ListDevices.
    pub fn list_devices(&self, p: Principal) -> ApiResult<v1::DeviceList> {
        let devices = self
            .store
            .devices(p.user_id)?
            .into_iter()
            .map(|(id, d)| v1::Device {
                device_id: id,
                name: d.name,
                platform: d.platform,
                created_at_ms: d.created_at_ms,
                last_seen_ms: d.last_seen_ms,
                current: id == p.device_id,
            })
            .collect();
        Ok(v1::DeviceList { devices })
    }

    /// RemoveDevice: returns the sessions revoked.
    pub fn remove_device(&self, p: Principal, device_id: u32) -> ApiResult<Vec<u64>> {
        self.store
            .device_remove(p.user_id, device_id)?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such device"))
    }

    /// DiscoverContacts: never stores the uploaded hashes.
    pub fn discover(
        &self,
        p: Principal,
        req: &v1::DiscoverContacts,
        now_ms: u64,
    ) -> ApiResult<v1::ContactMatches> {
        if req.phone_sha256.len() > 1000 {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "at most 1000 hashes per request",
            ));
        }
        self.limiter
            .check(
                &format!("discover:{}", p.user_id),
                self.cfg.discover_requests_per_hour,
                HOUR_MS,
                now_ms,
            )
            .map_err(|e| self.fail("rate_limited", e))?;
        let mut matches = Vec::new();
        for h in &req.phone_sha256 {
            if h.len() != 32 {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "each hash must be 32 bytes",
                ));
            }
            if let Some(uid) = self.store.user_by_phone_key(&self.phone_key_of_hash(h))?
                && uid != p.user_id
            {
                let name = self
                    .store
                    .user_get(uid)?
                    .map(|u| u.display_name)
                    .unwrap_or_default();
                matches.push(v1::ContactMatch {
                    phone_sha256: h.clone(),
                    user_id: uid,
                    display_name: name,
                });
            }
        }
        Ok(v1::ContactMatches { matches })
    }

    /// SetPassword (Argon2id).
    pub fn set_password(&self, p: Principal, req: &v1::SetPassword) -> ApiResult<()> {
        let n = req.new_password.chars().count();
        if !(8..=256).contains(&n) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "password: 8 to 256 characters",
            ));
        }
        let hash = self.hash_password(&req.new_password)?;
        let mut u = self.user(p)?;
        u.password_hash = Some(hash);
        self.store.user_put(p.user_id, &u)?;
        Ok(())
    }

    fn hash_password(&self, pw: &str) -> ApiResult<String> {
        use argon2::PasswordHasher as _;
        let params = argon2::Params::new(
            self.cfg.argon2_memory_kib,
            self.cfg.argon2_iterations,
            1,
            None,
        )
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("argon2 params: {e}")))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = random_bytes::<16>(&self.rng)?;
        a.hash_password_with_salt(pw.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("argon2: {e}")))
    }
}

fn verify_password(pw: &str, phc: &str) -> bool {
    use argon2::PasswordVerifier as _;
    argon2::Argon2::default()
        .verify_password(pw.as_bytes(), phc)
        .is_ok()
}

fn own_profile(user_id: u64, u: &UserRec) -> v1::Profile {
    v1::Profile {
        user_id,
        display_name: u.display_name.clone(),
        about: u.about.clone(),
        avatar: None,
        phone: u.phone.clone().unwrap_or_default(),
        email: u.email.clone().unwrap_or_default(),
        created_at_ms: u.created_at_ms,
        has_password: u.password_hash.is_some(),
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_normalised() {
        let phone = |p: &str| v1::Identifier {
            kind: Some(v1::identifier::Kind::Phone(p.into())),
        };
        assert!(parse_ident(Some(&phone("+14155550100"))).is_ok());
        assert!(parse_ident(Some(&phone("14155550100"))).is_err());
        assert!(parse_ident(Some(&phone("+1415x550100"))).is_err());
        let email = v1::Identifier {
            kind: Some(v1::identifier::Kind::Email(" Ana@Example.org ".into())),
        };
        assert_eq!(
            parse_ident(Some(&email)).unwrap().key,
            "email:ana@example.org"
        );
        assert!(parse_ident(None).is_err());
    }

    #[test]
    fn rate_limiter_windows() {
        let r = RateLimiter::default();
        assert!(r.check("k", 2, 1000, 0).is_ok());
        assert!(r.check("k", 2, 1000, 10).is_ok());
        let e = r.check("k", 2, 1000, 20).unwrap_err();
        assert_eq!((e.code, e.retry_after_ms), (ErrorCode::RateLimited, 980));
        assert!(r.check("k", 2, 1000, 1000).is_ok());
    }
}
