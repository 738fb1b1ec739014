//! The accounts front door: one-time codes, sign-in, sessions and tokens,
//! profile, devices and contact discovery.
//!
//! Where the work runs: store reads and writes (and webhooks) on the bounded
//! blocking pool; Argon2id password hashing on a small hashing pool of its
//! own, at a lower priority ([`crate::runtime::CpuPool`]); on the shard only
//! what is pure and cheap: [`Accounts::verify_access`] (an Ed25519 verify),
//! input parsing ([`ident`]) and admission decisions ([`limits`]), so that a
//! refused request costs neither a pool hop nor a hash.
//!
//! A password login goes: [`Accounts::admit_password_login`] on the shard
//! (parse, then the limits in [`limits`]), [`Accounts::check_password_login`]
//! on the hashing pool (the identifier's hash, then one Argon2id verify —
//! against a dummy when there is no account or no password, see
//! [`password`]), [`Accounts::finish_password_login`] on the blocking pool
//! (a session, or a durable failure count).
//!
//! Rate limits: the one-time-code budgets (per IP and per identifier) and
//! the failed-password budget per identifier are durable (written to the
//! store with the change that counts — a failed-password window from its
//! second failure on — and read back at start-up); per-code guess
//! counts live in the pending code's store record; the short per-IP password
//! windows, the global password rate and contact discovery are in memory.

pub mod ident;
pub mod limits;
pub mod lookups;
pub mod migrate;
pub mod password;
pub mod push;
pub mod seen;
pub mod sender;
pub mod tokens;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use starling_protocol::v1::{self, ErrorCode};

use crate::config::{AccountsConfig, OtpSenderConfig};
use crate::metrics::Metrics;
use crate::runtime::CpuPool;
use ident::{
    ABOUT_CHARS_MAX, DEVICE_NAME_CHARS_MAX, DISPLAY_NAME_CHARS_MAX, Ident, IdentKind, InputError,
    PLATFORM_CHARS_MAX, check_text,
};
use limits::{HashTicket, Limits, LimitsConfig, Refused, Window, WindowRow};
use password::{PASSWORD_CHARS_MAX, PASSWORD_CHARS_MIN, Passwords};
use seen::LastSeen;
use sender::OtpSender;
use starling_storage::accounts::{
    AccountStore, OtpIssue, OtpOutcome, RateWindow, RotateOutcome, SignIn, WindowWrites,
};
use starling_storage::meta::{AccountFields, OtpRecord, User};
use starling_storage::{DeviceId, EmbeddedMeta, StorageError, TimestampMs, UserId};
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

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        // A fault of the disk is reported to `health` by the metadata store's own hook.
        tracing::error!(error = %e, "account store failure");
        ApiError::new(ErrorCode::StorageFailure, "account store unavailable")
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::new(ErrorCode::InvalidArgument, e.to_string())
    }
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        ApiError {
            code: ErrorCode::RateLimited,
            message: e.reason.to_owned(),
            // At least 1: a RATE_LIMITED always says to wait.
            retry_after_ms: u32::try_from(e.retry_after_ms.max(1)).unwrap_or(u32::MAX),
        }
    }
}

impl From<password::HashError> for ApiError {
    fn from(e: password::HashError) -> Self {
        tracing::error!(error = %e, "password hashing failed");
        ApiError::new(ErrorCode::Internal, "password hashing failed")
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

const HOUR_MS: u64 = 3600 * 1000;

/// A password login admitted to the hashing pool
/// ([`Accounts::admit_password_login`]).
#[derive(Debug)]
pub struct PasswordLogin {
    ident: Ident,
    password: String,
    device: Option<v1::DeviceInfo>,
    ticket: HashTicket,
}

/// A password login after its hash ([`Accounts::check_password_login`]).
#[derive(Debug)]
pub struct CheckedLogin {
    /// The user, if the password matched.
    user_id: Option<u64>,
    device: Option<v1::DeviceInfo>,
    /// The identifier's failed-login window this attempt was charged to.
    failure_key: Option<String>,
}

/// A new password admitted to the hashing pool
/// ([`Accounts::admit_set_password`]).
#[derive(Debug)]
pub struct NewPassword {
    password: String,
    ticket: HashTicket,
}

/// Checks the free text of a device description.
fn check_device(d: Option<&v1::DeviceInfo>) -> Result<(), InputError> {
    if let Some(d) = d {
        check_text("device.name", &d.name, DEVICE_NAME_CHARS_MAX)?;
        check_text("device.platform", &d.platform, PLATFORM_CHARS_MAX)?;
    }
    Ok(())
}

/// The accounts service (shared by all shards).
#[derive(Debug)]
pub struct Accounts {
    cfg: AccountsConfig,
    store: Arc<dyn AccountStore>,
    /// Devices' last-seen times waiting for their coalesced write.
    seen: LastSeen,
    keys: TokenKeys,
    otp_key: ring::hmac::Key,
    pepper: ring::hmac::Key,
    sender: Box<dyn OtpSender>,
    limits: Arc<Limits>,
    passwords: Passwords,
    /// Where passwords are hashed (and nothing else).
    hashers: CpuPool,
    rng: ring::rand::SystemRandom,
    metrics: Arc<Metrics>,
}

fn random_bytes<const N: usize>(rng: &ring::rand::SystemRandom) -> ApiResult<[u8; N]> {
    ring::rand::generate::<[u8; N]>(rng)
        .map(ring::rand::Random::expose)
        .map_err(|_| ApiError::new(ErrorCode::Internal, "no randomness"))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

fn to_rate_windows((rows, deletes): (Vec<WindowRow>, Vec<String>)) -> WindowWrites {
    let rows = rows
        .into_iter()
        .map(|(key, w)| RateWindow {
            key,
            start_ms: w.start_ms,
            window_ms: w.window_ms,
            count: w.count,
        })
        .collect();
    (rows, deletes)
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
    /// Opens the accounts on the node's metadata store `meta` (after
    /// [`migrate::run`]), with their keys under `data_dir`.
    pub fn open(
        data_dir: &Path,
        meta: Arc<EmbeddedMeta>,
        cfg: AccountsConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let keys_dir = data_dir.join("keys");
        let keys = TokenKeys::load_or_generate(&keys_dir)?;
        let otp_secret = load_secret(&keys_dir.join("otp-hmac.key"))?;
        let pepper = load_secret(&keys_dir.join("contacts-pepper.key"))?;
        let store: Arc<dyn AccountStore> = meta;
        let sender: Box<dyn OtpSender> = match &cfg.otp_sender {
            OtpSenderConfig::Dev => Box::new(sender::DevFileSender::new(data_dir.join("otp.log"))),
            OtpSenderConfig::Webhook { url } => {
                Box::new(sender::WebhookSender::new(url).map_err(anyhow::Error::msg)?)
            }
        };
        // Making the dummy hash is also the first measure of a hash's time.
        let started_us = crate::clock::mono_us();
        let passwords = Passwords::new(cfg.argon2_memory_kib, cfg.argon2_iterations)?;
        let hash_ms = crate::clock::mono_us().saturating_sub(started_us) / 1000;
        let limits = Arc::new(Limits::new(limits_config(&cfg), hash_ms));
        let now_ms = crate::clock::unix_ms();
        let rows = store
            .windows_load()
            .context("reading the rate-limit windows")?
            .into_iter()
            .map(|w| {
                (
                    w.key,
                    Window {
                        start_ms: w.start_ms,
                        window_ms: w.window_ms,
                        count: w.count,
                    },
                )
            })
            .collect();
        let stale = limits.load(rows, now_ms);
        store
            .windows_write(&[], &stale)
            .context("pruning the rate-limit windows")?;
        let hashers = CpuPool::new(
            "starling-hash",
            cfg.password_hash_threads,
            cfg.password_queue_max as usize,
            cfg.password_hash_priority,
        )
        .context("starting the password hashing threads")?;
        let seen = LastSeen::start(
            store.clone(),
            cfg.last_seen_flush_ms,
            cfg.last_seen_pending_max,
        )
        .context("starting the last-seen writer")?;
        Ok(Self {
            cfg,
            store,
            seen,
            keys,
            otp_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &otp_secret),
            pepper: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &pepper),
            sender,
            limits,
            passwords,
            hashers,
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
        ring::hmac::sign(&self.otp_key, format!("{}\n{code}", ident.key()).as_bytes())
    }

    fn phone_key(&self, e164: &str) -> [u8; 32] {
        self.phone_key_of_hash(&sha256(e164.as_bytes()))
    }

    fn phone_key_of_hash(&self, sha256: &[u8]) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(ring::hmac::sign(&self.pepper, sha256).as_ref());
        out
    }

    /// Notes that `p`'s device was seen (connected, authenticated or
    /// disconnected) at `now_ms`. Cheap, no I/O: shard threads call it; the
    /// last-seen writer stores it, coalesced ([`seen`]).
    pub fn seen(&self, p: Principal, now_ms: u64) {
        self.seen.note(p.user_id, p.device_id, now_ms);
    }

    /// RequestOtp: the IP's and the identifier's hourly budgets (durable),
    /// then the resend interval, then a new code replaces any earlier one.
    pub fn request_otp(
        &self,
        req: &v1::RequestOtp,
        ip: IpAddr,
        now_ms: u64,
    ) -> ApiResult<v1::OtpSent> {
        let ident = Ident::parse(req.identifier.as_ref())?;
        let c = &self.cfg;
        let charge = self
            .limits
            .charge_otp(ip, ident.key(), now_ms)
            .map_err(|e| self.fail("rate_limited", e.into()))?;
        // Uniform 6 digits: rejection-sample a u32.
        let code = loop {
            let n = u32::from_le_bytes(random_bytes::<4>(&self.rng)?);
            if n < 4_294_000_000 {
                break format!("{:06}", n % 1_000_000);
            }
        };
        let mut code_hmac = [0; 32];
        code_hmac.copy_from_slice(self.otp_mac(&ident, &code).as_ref());
        let rec = OtpRecord {
            ident: ident.key().to_owned(),
            code_hmac,
            expires_ms: TimestampMs(now_ms + c.otp_ttl_ms),
            attempts_left: c.otp_attempts_max,
            created_ms: TimestampMs(now_ms),
        };
        // The budgets' new counts are written with the code, in one transaction.
        let windows = || to_rate_windows(self.limits.durable_rows(charge.keys()));
        match self
            .store
            .otp_issue(&rec, c.otp_resend_ms, now_ms, &windows)
        {
            Ok(OtpIssue::Issued) => {}
            Ok(OtpIssue::TooSoon(wait_ms)) => {
                self.limits.refund_otp(&charge, now_ms);
                return Err(self.fail(
                    "rate_limited",
                    Refused {
                        reason: "a code was sent recently",
                        retry_after_ms: wait_ms,
                    }
                    .into(),
                ));
            }
            Err(e) => {
                self.limits.refund_otp(&charge, now_ms);
                return Err(e.into());
            }
        }
        self.sender.send(ident.value(), &code).map_err(|e| {
            tracing::warn!(error = %e, "otp delivery failed");
            ApiError::new(ErrorCode::Unavailable, "could not deliver the code")
        })?;
        Ok(v1::OtpSent {
            expires_at_ms: rec.expires_ms.0,
            resend_after_ms: u32::try_from(c.otp_resend_ms).unwrap_or(u32::MAX),
            attempts_allowed: c.otp_attempts_max,
        })
    }

    /// Checks a guess at `ident`'s pending code. Every guess spends one of
    /// the code's attempts, a malformed one too; the guess that spends the
    /// last one is answered OTP_ATTEMPTS_EXCEEDED if wrong, and so is every
    /// later guess at that code, right or wrong.
    fn check_otp(&self, ident: &Ident, code: &str, now_ms: u64) -> ApiResult<()> {
        let code = code.trim();
        let outcome = self.store.otp_consume(ident.key(), now_ms, &|rec| {
            ring::hmac::verify(
                &self.otp_key,
                format!("{}\n{code}", ident.key()).as_bytes(),
                &rec.code_hmac,
            )
            .is_ok()
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
                    format!(
                        "wrong code, {left} {} left",
                        if left == 1 { "attempt" } else { "attempts" }
                    ),
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
        let refresh = self.new_refresh_token()?;
        let refresh_expires_at_ms = now_ms + self.cfg.refresh_token_ttl_ms;
        // The device and its session in one transaction. The device's text
        // was checked before anything was spent on the request (check_device).
        let (device_id, session_id) = self.store.sign_in(&SignIn {
            user: UserId(user_id),
            device_name: &d.name,
            platform: &d.platform,
            refresh_hash: sha256(refresh.as_bytes()),
            refresh_expires: TimestampMs(refresh_expires_at_ms),
            now: TimestampMs(now_ms),
        })?;
        let principal = Principal {
            user_id,
            device_id: device_id.0,
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
        let ident = Ident::parse(req.identifier.as_ref())?;
        // Bad text is refused before the guess is spent.
        let name = req.display_name.trim();
        check_text("display_name", name, DISPLAY_NAME_CHARS_MAX)?;
        check_device(req.device.as_ref())?;
        self.check_otp(&ident, &req.code, now_ms)?;
        let is_phone = ident.kind() == IdentKind::Phone;
        let value = || ident.value().to_owned();
        let rec = User {
            display_name: name.to_owned(),
            phone_e164: if is_phone { value() } else { String::new() },
            created_ms: TimestampMs(now_ms),
            account: Some(AccountFields {
                email: if is_phone { String::new() } else { value() },
                about: String::new(),
                next_device_id: 1,
            }),
            ..User::default()
        };
        let phone_key = is_phone.then(|| self.phone_key(ident.value()));
        let (user_id, created) = self
            .store
            .user_create(ident.key(), &rec, phone_key.as_ref())?;
        self.grant(user_id.0, req.device.as_ref(), created, now_ms)
    }

    /// Login with a one-time code (a password login goes through
    /// [`Accounts::admit_password_login`]).
    pub fn login_otp(&self, req: &v1::Login, now_ms: u64) -> ApiResult<Granted> {
        let ident = Ident::parse(req.identifier.as_ref())?;
        check_device(req.device.as_ref())?;
        let Some(v1::login::Credential::OtpCode(code)) = &req.credential else {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "credential is required",
            ));
        };
        self.check_otp(&ident, code, now_ms)?;
        let user_id = self.store.user_by_ident(ident.key())?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                "no such user; use VerifyOtp to register",
            )
        })?;
        self.grant(user_id.0, req.device.as_ref(), false, now_ms)
    }

    /// A password login, first step (on the shard: no store access, no
    /// hash): parses it and admits it to the hashing pool, or refuses it
    /// with RATE_LIMITED. The decision does not depend on whether the
    /// identifier has an account.
    pub fn admit_password_login(
        &self,
        req: v1::Login,
        ip: IpAddr,
        now_ms: u64,
    ) -> ApiResult<PasswordLogin> {
        let ident = Ident::parse(req.identifier.as_ref())?;
        check_device(req.device.as_ref())?;
        let Some(v1::login::Credential::Password(password)) = req.credential else {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "credential is required",
            ));
        };
        let ticket = self
            .limits
            .admit_password(ip, Some(ident.key()), now_ms)
            .map_err(|e| self.fail("rate_limited", e.into()))?;
        Ok(PasswordLogin {
            ident,
            password,
            device: req.device,
            ticket,
        })
    }

    /// A password login, second step: on the hashing pool, the identifier's
    /// password hash, then exactly one Argon2id verify (against the dummy
    /// when there is no account or no password).
    pub async fn check_password_login(
        self: &Arc<Self>,
        login: PasswordLogin,
    ) -> ApiResult<CheckedLogin> {
        let acc = self.clone();
        self.on_hashers(move || acc.check_password_blocking(login))
            .await?
    }

    fn check_password_blocking(&self, login: PasswordLogin) -> ApiResult<CheckedLogin> {
        let PasswordLogin {
            ident,
            password,
            device,
            ticket,
        } = login;
        let (user_id, phc) = match self.store.user_by_ident(ident.key())? {
            Some(uid) => (
                Some(uid.0),
                self.store.user_get(uid)?.and_then(|u| u.password_hash),
            ),
            None => (None, None),
        };
        let started_us = crate::clock::mono_us();
        let matched = self.passwords.verify(&password, phc.as_deref());
        ticket.hashed_in_ms(crate::clock::mono_us().saturating_sub(started_us) / 1000);
        Ok(CheckedLogin {
            user_id: user_id.filter(|_| matched),
            device,
            failure_key: ticket.failure_key().map(str::to_owned),
        })
    }

    /// A password login, last step (store writes): a session, or the
    /// failure counted durably and INVALID_CREDENTIALS — the same answer
    /// whether the identifier is unknown, has no password or the password is
    /// wrong.
    pub fn finish_password_login(&self, login: CheckedLogin, now_ms: u64) -> ApiResult<Granted> {
        if let Some(user_id) = login.user_id {
            if let Some(k) = &login.failure_key {
                self.limits.password_ok(k, now_ms);
            }
            return self.grant(user_id, login.device.as_ref(), false, now_ms);
        }
        // Unknown or known identifier alike: whether this writes depends only
        // on the identifier's failure count.
        if let Some((rows, deletes)) = login
            .failure_key
            .as_deref()
            .and_then(|k| self.limits.failure_rows(k))
            && let Err(e) = {
                let (rows, deletes) = to_rate_windows((rows, deletes));
                self.store.windows_write(&rows, &deletes)
            }
        {
            // Counted in memory all the same; only a restart would forget it.
            tracing::warn!(error = %e, "writing a failed-login count");
        }
        Err(self.fail(
            "invalid_credentials",
            ApiError::new(
                ErrorCode::InvalidCredentials,
                "wrong identifier or password",
            ),
        ))
    }

    /// Runs `f` on the hashing pool.
    async fn on_hashers<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> ApiResult<T> {
        // Admission keeps the pool's queue from filling; if it is full anyway,
        // the answer is the same as the admission's.
        let job = self.hashers.run(f).map_err(|_| {
            ApiError::from(Refused {
                reason: "the server is checking too many passwords",
                retry_after_ms: 1000,
            })
        })?;
        job.await
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "internal error"))
    }

    /// Refresh: rotates the refresh token; reuse revokes the session.
    /// On reuse, returns the revoked session id in the error path's second
    /// element so live connections can be closed.
    pub fn refresh(
        &self,
        req: &v1::Refresh,
        now_ms: u64,
    ) -> Result<Granted, (ApiError, Option<u64>)> {
        let old = sha256(req.refresh_token.as_bytes());
        let new = self.new_refresh_token().map_err(|e| (e, None))?;
        let exp = now_ms + self.cfg.refresh_token_ttl_ms;
        let outcome = self
            .store
            .refresh_rotate(&old, &sha256(new.as_bytes()), TimestampMs(exp), now_ms)
            .map_err(|e| (e.into(), None))?;
        match outcome {
            RotateOutcome::Rotated(s) => self
                .tokens_for(
                    Principal {
                        user_id: s.user.0,
                        device_id: s.device.0,
                        session_id: s.id,
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
            Some(s) if !s.revoked && s.user.0 == p.user_id && s.device.0 == p.device_id => Ok(p),
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
            Some(s) if s.user.0 == p.user_id => {
                self.store.session_revoke(sid)?;
                Ok(sid)
            }
            _ => Err(ApiError::new(ErrorCode::NotFound, "no such session")),
        }
    }

    fn user(&self, p: Principal) -> ApiResult<User> {
        self.store.user_get(UserId(p.user_id))?.ok_or_else(no_user)
    }

    /// GetMe.
    pub fn get_me(&self, p: Principal) -> ApiResult<v1::Profile> {
        Ok(own_profile(&self.user(p)?))
    }

    /// The public profile of `user_id` (no phone, e-mail or password flag), if the user exists.
    pub fn public_profile(&self, user_id: u64) -> ApiResult<Option<v1::Profile>> {
        Ok(self.store.user_get(UserId(user_id))?.map(|u| v1::Profile {
            user_id,
            about: u.account.map(|a| a.about).unwrap_or_default(),
            display_name: u.display_name,
            avatar: None,
            created_at_ms: u.created_ms.0,
            ..v1::Profile::default()
        }))
    }

    /// UpdateProfile: durable before it returns, in the record every
    /// conversation title is read from, so that once the client has its
    /// `Profile` every conversation list shows the new name.
    pub fn update_profile(&self, p: Principal, req: &v1::UpdateProfile) -> ApiResult<v1::Profile> {
        let name = req.display_name.as_deref().map(str::trim);
        if let Some(n) = name {
            check_text("display_name", n, DISPLAY_NAME_CHARS_MAX)?;
        }
        if let Some(a) = &req.about {
            check_text("about", a, ABOUT_CHARS_MAX)?;
        }
        // Read, changed and written in one transaction: a SetPassword or a
        // rename on another device at the same time is not undone.
        let u = self
            .store
            .user_update(UserId(p.user_id), &|u| {
                if let Some(n) = name {
                    n.clone_into(&mut u.display_name);
                }
                if let Some(a) = &req.about {
                    a.clone_into(&mut u.account.get_or_insert_with(AccountFields::default).about);
                }
            })?
            .ok_or_else(no_user)?;
        Ok(own_profile(&u))
    }

    /// ListDevices. Last-seen times not yet written are shown all the same.
    pub fn list_devices(&self, p: Principal) -> ApiResult<v1::DeviceList> {
        let devices = self
            .store
            .devices(UserId(p.user_id))?
            .into_iter()
            .map(|d| v1::Device {
                device_id: d.device.0,
                name: d.name,
                platform: d.platform,
                created_at_ms: d.created_ms.0,
                last_seen_ms: d
                    .last_seen_ms
                    .0
                    .max(self.seen.pending(p.user_id, d.device.0)),
                current: d.device.0 == p.device_id,
            })
            .collect();
        Ok(v1::DeviceList { devices })
    }

    /// RemoveDevice: returns the sessions revoked.
    pub fn remove_device(&self, p: Principal, device_id: u32) -> ApiResult<Vec<u64>> {
        self.store
            .device_remove(UserId(p.user_id), DeviceId(device_id))?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such device"))
    }

    /// RegisterPushToken: the device's token (replacing the one it had) is durable before it
    /// returns.
    pub fn register_push_token(
        &self,
        p: Principal,
        req: &v1::RegisterPushToken,
        now_ms: u64,
    ) -> ApiResult<()> {
        let t = push::parse(req)?;
        let stored = self
            .store
            .push_token_set(&starling_storage::meta::PushToken {
                user: UserId(p.user_id),
                device: DeviceId(p.device_id),
                provider: t.provider.to_owned(),
                token: t.token.into_bytes(),
                app_id: t.app_id,
                sandbox: t.sandbox,
                updated_ms: TimestampMs(now_ms),
            })?;
        if stored {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::SessionRevoked,
                "this device was removed",
            ))
        }
    }

    /// UnregisterPushToken: done (durably) whether or not the device had a token.
    pub fn unregister_push_token(&self, p: Principal) -> ApiResult<()> {
        self.store
            .push_token_remove(UserId(p.user_id), DeviceId(p.device_id))?;
        Ok(())
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
        if req.phone_sha256.iter().any(|h| h.len() != 32) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "each hash must be 32 bytes",
            ));
        }
        self.limits
            .charge_discover(p.user_id, req.phone_sha256.iter().map(|h| &h[..]), now_ms)
            .map_err(|e| self.fail("rate_limited", e.into()))?;
        let mut matches = Vec::new();
        for h in &req.phone_sha256 {
            if let Some(uid) = self.store.user_by_phone_key(&self.phone_key_of_hash(h))?
                && uid.0 != p.user_id
            {
                let name = self
                    .store
                    .user_get(uid)?
                    .map(|u| u.display_name)
                    .unwrap_or_default();
                matches.push(v1::ContactMatch {
                    phone_sha256: h.clone(),
                    user_id: uid.0,
                    display_name: name,
                });
            }
        }
        Ok(v1::ContactMatches { matches })
    }

    /// SetPassword, first step (on the shard): checks the password's length
    /// and admits its hash to the hashing pool, or refuses it.
    pub fn admit_set_password(
        &self,
        req: v1::SetPassword,
        ip: IpAddr,
        now_ms: u64,
    ) -> ApiResult<NewPassword> {
        let n = req.new_password.chars().count();
        if !(PASSWORD_CHARS_MIN..=PASSWORD_CHARS_MAX).contains(&n) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("password: {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters"),
            ));
        }
        let ticket = self
            .limits
            .admit_password(ip, None, now_ms)
            .map_err(|e| self.fail("rate_limited", e.into()))?;
        Ok(NewPassword {
            password: req.new_password,
            ticket,
        })
    }

    /// SetPassword, second step: the Argon2id hash, on the hashing pool.
    pub async fn hash_new_password(self: &Arc<Self>, new: NewPassword) -> ApiResult<String> {
        let acc = self.clone();
        self.on_hashers(move || {
            let started_us = crate::clock::mono_us();
            let phc = acc.passwords.hash(&new.password);
            new.ticket
                .hashed_in_ms(crate::clock::mono_us().saturating_sub(started_us) / 1000);
            phc
        })
        .await?
        .map_err(ApiError::from)
    }

    /// SetPassword, last step (a store write).
    pub fn store_password(&self, p: Principal, phc: String) -> ApiResult<()> {
        self.store
            .user_update(UserId(p.user_id), &|u| u.password_hash = Some(phc.clone()))?
            .ok_or_else(no_user)?;
        Ok(())
    }
}

fn no_user() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "user not found")
}

fn own_profile(u: &User) -> v1::Profile {
    let a = u.account.clone().unwrap_or_default();
    v1::Profile {
        user_id: u.id.0,
        display_name: u.display_name.clone(),
        about: a.about,
        avatar: None,
        phone: u.phone_e164.clone(),
        email: a.email,
        created_at_ms: u.created_ms.0,
        has_password: u.password_hash.is_some(),
    }
}

fn limits_config(c: &AccountsConfig) -> LimitsConfig {
    LimitsConfig {
        otp_per_ip: c.otp_requests_per_ip_per_hour,
        otp_per_identifier: c.otp_requests_per_identifier_per_hour,
        otp_window_ms: HOUR_MS,
        password_failures_per_identifier: c.password_failures_per_identifier_per_hour,
        password_failure_window_ms: HOUR_MS,
        password_per_ip_per_minute: c.password_checks_per_ip_per_minute,
        password_inflight_per_ip: c.password_checks_inflight_per_ip_max,
        password_queue_max: c.password_queue_max,
        password_per_sec: c.password_checks_per_sec,
        password_burst: c.password_checks_burst,
        hash_threads: u32::try_from(c.password_hash_threads).unwrap_or(u32::MAX),
        discover_numbers_per_user: c.discover_numbers_per_hour,
        discover_window_ms: HOUR_MS,
        discover_numbers_remembered_max: c.discover_numbers_remembered_max,
        windows_max: c.rate_windows_max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::net::Ipv4Addr;
    use std::task::{Context, Poll, Wake, Waker};

    /// Runs a future to completion on this thread (the hashing pool wakes it).
    fn block_on<F: Future>(f: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(10));
        }
    }

    fn cfg() -> AccountsConfig {
        AccountsConfig {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            otp_requests_per_ip_per_hour: 2,
            ..AccountsConfig::default()
        }
    }

    fn open(dir: &Path, cfg: AccountsConfig) -> Arc<Accounts> {
        let meta = Arc::new(EmbeddedMeta::open(&dir.join("meta.redb")).unwrap());
        Arc::new(Accounts::open(dir, meta, cfg, Arc::new(Metrics::new(1, Vec::new()))).unwrap())
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn email(e: &str) -> Option<v1::Identifier> {
        Some(v1::Identifier {
            kind: Some(v1::identifier::Kind::Email(e.into())),
        })
    }

    fn request(acc: &Accounts, e: &str, from: IpAddr, now_ms: u64) -> ApiResult<v1::OtpSent> {
        acc.request_otp(
            &v1::RequestOtp {
                identifier: email(e),
            },
            from,
            now_ms,
        )
    }

    fn code_for(dir: &Path, e: &str) -> String {
        let log = std::fs::read_to_string(dir.join("otp.log")).unwrap();
        let line = log.lines().rev().find(|l| l.starts_with(&format!("{e} ")));
        line.unwrap().rsplit(' ').next().unwrap().to_owned()
    }

    fn password_login(
        acc: &Arc<Accounts>,
        e: &str,
        pw: &str,
        from: IpAddr,
        now_ms: u64,
    ) -> ApiResult<Granted> {
        let login = acc.admit_password_login(
            v1::Login {
                identifier: email(e),
                credential: Some(v1::login::Credential::Password(pw.into())),
                device: None,
            },
            from,
            now_ms,
        )?;
        let checked = block_on(acc.check_password_login(login))?;
        acc.finish_password_login(checked, now_ms)
    }

    #[test]
    fn otp_budgets_survive_a_reopen() {
        // Windows are stored with wall-clock times: ones that ended are
        // pruned at start-up, so the test runs at the real time.
        let t0 = crate::clock::unix_ms();
        let dir = tempfile::tempdir().unwrap();
        let acc = open(dir.path(), cfg());
        request(&acc, "a@x.org", ip(1), t0).unwrap();
        request(&acc, "b@x.org", ip(1), t0 + 1000).unwrap();
        let e = request(&acc, "c@x.org", ip(1), t0 + 2000).unwrap_err();
        assert_eq!(
            (e.code, e.retry_after_ms),
            (ErrorCode::RateLimited, 3_600_000 - 2000)
        );
        // Too soon for the same identifier: refused, and the IP's budget
        // is not charged for it (ip(2) has 2 codes left after it).
        let e = request(&acc, "a@x.org", ip(2), t0 + 3000).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str(), e.retry_after_ms),
            (ErrorCode::RateLimited, "a code was sent recently", 27_000)
        );
        drop(acc);
        let acc = open(dir.path(), cfg());
        // The window is the one that started before the restart.
        let e = request(&acc, "c@x.org", ip(1), t0 + 10_000).unwrap_err();
        assert_eq!(
            (e.code, e.retry_after_ms),
            (ErrorCode::RateLimited, 3_600_000 - 10_000)
        );
        request(&acc, "d@x.org", ip(2), t0 + 10_000).unwrap();
        request(&acc, "e@x.org", ip(2), t0 + 10_000).unwrap();
        assert!(request(&acc, "f@x.org", ip(2), t0 + 10_000).is_err());
        // And it ends when it would have.
        request(&acc, "c@x.org", ip(1), t0 + 3_600_000).unwrap();
    }

    #[test]
    fn unknown_accounts_and_wrong_passwords_fail_alike() {
        let t0 = crate::clock::unix_ms();
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.password_failures_per_identifier_per_hour = 3;
        let acc = open(dir.path(), c.clone());
        request(&acc, "ana@x.org", ip(1), t0).unwrap();
        let g = acc
            .verify_otp(
                &v1::VerifyOtp {
                    identifier: email("ana@x.org"),
                    code: code_for(dir.path(), "ana@x.org"),
                    device: None,
                    display_name: "Ana".into(),
                },
                t0,
            )
            .unwrap();
        // No password yet, a wrong one, no account: one answer.
        let no_password =
            password_login(&acc, "ana@x.org", "correct horse", ip(1), t0).unwrap_err();
        let new = acc
            .admit_set_password(
                v1::SetPassword {
                    new_password: "correct horse".into(),
                },
                ip(1),
                t0,
            )
            .unwrap();
        let phc = block_on(acc.hash_new_password(new)).unwrap();
        acc.store_password(g.principal, phc).unwrap();
        let wrong = password_login(&acc, "ana@x.org", "wrong horse", ip(2), t0).unwrap_err();
        let unknown = password_login(&acc, "nobody@x.org", "correct horse", ip(3), t0).unwrap_err();
        for e in [&no_password, &wrong, &unknown] {
            assert_eq!(e, &no_password);
            assert_eq!(e.code, ErrorCode::InvalidCredentials);
        }
        assert_eq!(
            password_login(&acc, "ana@x.org", "correct horse", ip(4), t0)
                .unwrap()
                .principal
                .user_id,
            g.principal.user_id
        );
        // Failures are counted per identifier, known or not, and durably
        // from the second on: ana has 2 (the success took its own back);
        // nobody's single failure was not written.
        drop(acc);
        let acc = open(dir.path(), c);
        password_login(&acc, "ana@x.org", "x", ip(5), t0).unwrap_err();
        let e = password_login(&acc, "ana@x.org", "correct horse", ip(6), t0).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                ErrorCode::RateLimited,
                "too many failed password logins for this identifier"
            )
        );
        assert!(e.retry_after_ms > 3_000_000);
        for n in 7..10 {
            let e = password_login(&acc, "nobody@x.org", "x", ip(n), t0).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidCredentials);
        }
        let e = password_login(&acc, "nobody@x.org", "x", ip(10), t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
    }

    #[test]
    fn bad_text_is_refused_before_the_code_is_spent() {
        let t0 = crate::clock::unix_ms();
        let dir = tempfile::tempdir().unwrap();
        let acc = open(dir.path(), cfg());
        request(&acc, "ana@x.org", ip(1), t0).unwrap();
        let code = code_for(dir.path(), "ana@x.org");
        let verify = |name: &str, device: &str| {
            acc.verify_otp(
                &v1::VerifyOtp {
                    identifier: email("ana@x.org"),
                    code: code.clone(),
                    device: Some(v1::DeviceInfo {
                        name: device.into(),
                        platform: "linux".into(),
                    }),
                    display_name: name.into(),
                },
                t0,
            )
        };
        let long = "p".repeat(101);
        for (name, device) in [
            ("Ana\nroot", "phone"),
            ("Ana\u{1b}[2J", "phone"),
            (long.as_str(), "phone"),
            ("Ana", "phone\r"),
            ("Ana", long.as_str()),
        ] {
            let e = verify(name, device).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{name:?} {device:?}");
        }
        // Five refused, five attempts allowed: had one been spent, the right
        // code would now be refused.
        let g = verify(" Ana ", "phone").unwrap();
        assert_eq!(acc.get_me(g.principal).unwrap().display_name, "Ana");
        let e = acc
            .update_profile(
                g.principal,
                &v1::UpdateProfile {
                    about: Some("line one\nline two".into()),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                ErrorCode::InvalidArgument,
                "about: control characters and line breaks are not allowed"
            )
        );
    }

    #[test]
    fn the_forged_line_identifier_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let acc = open(dir.path(), cfg());
        let e = request(
            &acc,
            "x\n+1999 000000@rel.test",
            ip(1),
            crate::clock::unix_ms(),
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(!dir.path().join("otp.log").exists());
    }
}
