//! Rate limits and admission control of the account front door. Pure
//! bookkeeping: every decision takes `now_ms` (Unix ms) as an argument, so
//! the logic is tested with a fake clock; nothing here blocks, hashes or
//! touches the store.
//!
//! - **Fixed windows** ([`Windows`]): a key (an IP, an identifier) counts
//!   events for `window_ms` from its first one; at the limit it is refused
//!   until the window ends, and the refusal says when that is. The windows
//!   that must survive a restart (one-time codes per IP and per identifier,
//!   failed password logins per identifier) are *durable*: the caller writes
//!   the rows [`Limits::durable_rows`] returns to the account store when one
//!   of them changes, and [`Limits::load`] reads them back at start-up. The
//!   one-time-code windows are written with every code (in the transaction
//!   that stores the code, so they cost no write of their own). A
//!   failed-login window is written from its second failure on
//!   ([`Limits::failure_rows`]): a single failure is what a flood of logins
//!   for ever-new identifiers (credential stuffing) produces, and it then
//!   costs the store nothing; a restart forgets at most one failure per
//!   identifier. The map is bounded by `entries_max`: expired windows are
//!   dropped first, then the oldest (the ones that end soonest).
//! - **Password admission** ([`Limits::admit_password`]): in front of the
//!   hashing pool, in this order: failed logins per identifier, password
//!   checks in progress per IP, checks per IP per minute, checks admitted
//!   but not finished (the queue), then a global token bucket. A refused
//!   check costs no hash and consumes none of the budgets it did not pass.
//!   The identifier's failures are counted whether or not an account
//!   exists, so the decision reveals nothing about accounts.
//!
//! IPv6 clients are limited per /64 (a host usually holds a whole /64), and
//! IPv4-mapped addresses as the IPv4 address they carry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::lookups::Lookups;

/// A refusal: why, and when a retry can succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// For humans (the Error frame's message).
    pub reason: &'static str,
    /// A retry before this many milliseconds is refused again.
    pub retry_after_ms: u64,
}

/// One fixed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// When its first event happened (Unix ms).
    pub start_ms: u64,
    /// How long it lasts.
    pub window_ms: u64,
    /// Events counted in it.
    pub count: u32,
}

impl Window {
    /// When it ends (Unix ms).
    #[must_use]
    pub fn end_ms(&self) -> u64 {
        self.start_ms.saturating_add(self.window_ms)
    }

    fn live(&self, now_ms: u64) -> bool {
        self.end_ms() > now_ms
    }
}

/// Fixed windows by key, at most `entries_max` of them.
#[derive(Debug)]
pub struct Windows {
    map: HashMap<String, Window>,
    entries_max: usize,
    /// Keys dropped from the map since the last [`Windows::take_dropped`]
    /// (so that the durable copy drops them too).
    dropped: Vec<String>,
}

impl Windows {
    /// An empty set holding at most `entries_max` windows.
    #[must_use]
    pub fn new(entries_max: usize) -> Self {
        Self {
            map: HashMap::new(),
            entries_max: entries_max.max(1),
            dropped: Vec::new(),
        }
    }

    /// Refuses if `key` has a live window holding `limit` events or more.
    fn check(
        &self,
        key: &str,
        limit: u32,
        reason: &'static str,
        now_ms: u64,
    ) -> Result<(), Refused> {
        match self.map.get(key) {
            Some(w) if w.live(now_ms) && w.count >= limit => Err(Refused {
                reason,
                retry_after_ms: w.end_ms() - now_ms,
            }),
            _ => Ok(()),
        }
    }

    /// Counts one event for `key` (a new window if it has no live one).
    fn charge(&mut self, key: &str, window_ms: u64, now_ms: u64) -> Window {
        if !self.map.contains_key(key) && self.map.len() >= self.entries_max {
            self.make_room(now_ms);
        }
        let w = self.map.entry(key.to_owned()).or_insert(Window {
            start_ms: now_ms,
            window_ms,
            count: 0,
        });
        if !w.live(now_ms) {
            *w = Window {
                start_ms: now_ms,
                window_ms,
                count: 0,
            };
        }
        w.count = w.count.saturating_add(1);
        *w
    }

    /// Takes back one event counted by [`Windows::charge`] (it did not
    /// happen after all, or did not count).
    fn refund(&mut self, key: &str, now_ms: u64) {
        if let Some(w) = self.map.get_mut(key)
            && w.live(now_ms)
        {
            w.count = w.count.saturating_sub(1);
        }
    }

    /// Drops expired windows; if that is not enough, the sixteenth that end
    /// soonest.
    fn make_room(&mut self, now_ms: u64) {
        let dropped = &mut self.dropped;
        self.map.retain(|k, w| {
            let keep = w.live(now_ms);
            if !keep {
                dropped.push(k.clone());
            }
            keep
        });
        if self.map.len() >= self.entries_max {
            let mut by_end: Vec<(u64, String)> = self
                .map
                .iter()
                .map(|(k, w)| (w.end_ms(), k.clone()))
                .collect();
            by_end.sort_unstable();
            for (_, k) in by_end.into_iter().take(self.entries_max / 16 + 1) {
                self.map.remove(&k);
                self.dropped.push(k);
            }
        }
        // Only the durable copy needs these, and it is pruned at start-up
        // anyway: never let an unwritten backlog grow past the map's size.
        if self.dropped.len() > self.entries_max {
            let excess = self.dropped.len() - self.entries_max;
            self.dropped.drain(..excess);
        }
    }

    /// The window of `key`, if any.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<Window> {
        self.map.get(key).copied()
    }

    /// Keys dropped since the last call.
    pub fn take_dropped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.dropped)
    }

    /// Windows held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A token bucket: `rate_per_sec` tokens a second, at most `burst` saved.
#[derive(Debug)]
struct TokenBucket {
    rate_per_sec: u64,
    burst: u64,
    /// Thousandths of a token.
    milli: u64,
    last_ms: u64,
}

impl TokenBucket {
    fn new(rate_per_sec: u32, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        Self {
            rate_per_sec: u64::from(rate_per_sec.max(1)),
            burst,
            milli: burst * 1000,
            last_ms: 0,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate tokens/s = rate milli-tokens/ms.
        self.milli =
            (self.milli + elapsed.saturating_mul(self.rate_per_sec)).min(self.burst * 1000);
    }

    /// Milliseconds until a token is there (0: one is there now).
    fn wait_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        (1000u64.saturating_sub(self.milli)).div_ceil(self.rate_per_sec)
    }

    fn take(&mut self) {
        self.milli = self.milli.saturating_sub(1000);
    }
}

/// The limits, from the configuration.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// One-time codes sent per IP per window.
    pub otp_per_ip: u32,
    /// One-time codes sent per identifier per window.
    pub otp_per_identifier: u32,
    /// The one-time-code windows.
    pub otp_window_ms: u64,
    /// Failed password logins per identifier per window.
    pub password_failures_per_identifier: u32,
    /// The failed-login window.
    pub password_failure_window_ms: u64,
    /// Password checks per IP per minute.
    pub password_per_ip_per_minute: u32,
    /// Password checks in progress per IP.
    pub password_inflight_per_ip: u32,
    /// Password checks admitted but not finished (waiting or hashing).
    pub password_queue_max: u32,
    /// Password checks per second over all clients.
    pub password_per_sec: u32,
    /// Burst of the global rate.
    pub password_burst: u32,
    /// Threads hashing passwords (for the wait estimates).
    pub hash_threads: u32,
    /// New numbers a user may look up with DiscoverContacts per window
    /// ([`crate::accounts::lookups`]).
    pub discover_numbers_per_user: u32,
    /// The DiscoverContacts window.
    pub discover_window_ms: u64,
    /// Numbers remembered over all users (repeats within a window are
    /// free only while remembered).
    pub discover_numbers_remembered_max: usize,
    /// Windows kept, durable and in memory each.
    pub windows_max: usize,
}

const MINUTE_MS: u64 = 60 * 1000;

/// A failed-login window is written to the store once it counts this many.
pub const FAILURES_DURABLE_FROM: u32 = 2;

/// Key prefixes of the durable windows (they name the table rows).
const OTP_IP: &str = "otp-ip:";
const OTP_IDENT: &str = "otp-ident:";
const PASSWORD_FAILURES: &str = "password-failures:";

#[derive(Debug)]
struct State {
    /// Survive restarts (written to the account store).
    durable: Windows,
    /// In memory only: short windows.
    volatile: Windows,
    /// Contact discovery's budgets (in memory).
    lookups: Lookups,
    bucket: TokenBucket,
    /// Password checks admitted and not finished.
    hashing: u32,
    hashing_per_ip: HashMap<String, u32>,
    /// Recent time of one hash (exponentially weighted).
    hash_ms: u64,
}

/// Every limit of the account front door (shared by all threads).
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    state: Mutex<State>,
}

/// A row of the durable windows table.
pub type WindowRow = (String, Window);

/// One-time-code budgets charged for a code about to be sent.
#[derive(Debug)]
pub struct OtpCharge {
    keys: [String; 2],
}

impl OtpCharge {
    /// The durable windows this charge changed.
    #[must_use]
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// A password check admitted to the hashing pool. Dropping it (when the hash
/// is done, or the check abandoned) frees its place in the queue and its
/// IP's count of checks in progress.
#[derive(Debug)]
pub struct HashTicket {
    limits: Arc<Limits>,
    ip: String,
    /// The identifier's failed-login window charged for this check.
    failure_key: Option<String>,
}

impl HashTicket {
    /// The durable window charged for this check, if any.
    #[must_use]
    pub fn failure_key(&self) -> Option<&str> {
        self.failure_key.as_deref()
    }

    /// Reports how long the hash took (feeds the wait estimates).
    pub fn hashed_in_ms(&self, ms: u64) {
        let mut s = self.limits.lock();
        // 1/4 new, 3/4 old: follows a change of machine load within a few hashes.
        s.hash_ms = (s.hash_ms * 3 + ms.max(1)).div_ceil(4);
    }
}

impl Drop for HashTicket {
    fn drop(&mut self) {
        let mut s = self.limits.lock();
        s.hashing = s.hashing.saturating_sub(1);
        if let Some(n) = s.hashing_per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.hashing_per_ip.remove(&self.ip);
            }
        }
    }
}

/// The key a client address is limited under: IPv4 as is, IPv6 by /64.
#[must_use]
pub fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Limits {
    /// Limits with nothing counted yet; `hash_ms` is a first estimate of
    /// one hash's time.
    #[must_use]
    pub fn new(cfg: LimitsConfig, hash_ms: u64) -> Self {
        let state = State {
            durable: Windows::new(cfg.windows_max),
            volatile: Windows::new(cfg.windows_max),
            lookups: Lookups::new(cfg.windows_max, cfg.discover_numbers_remembered_max),
            bucket: TokenBucket::new(cfg.password_per_sec, cfg.password_burst),
            hashing: 0,
            hashing_per_ip: HashMap::new(),
            hash_ms: hash_ms.max(1),
        };
        Self {
            cfg,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a set of counters, each updated in one step: it stays
        // consistent even if a holder panicked.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the durable windows read from the store at start-up. Returns
    /// the keys to delete from the store: windows that have ended, and the
    /// oldest beyond `windows_max`.
    pub fn load(&self, rows: Vec<WindowRow>, now_ms: u64) -> Vec<String> {
        let (mut live, mut gone): (Vec<WindowRow>, Vec<WindowRow>) =
            rows.into_iter().partition(|(_, w)| w.live(now_ms));
        live.sort_unstable_by_key(|(_, w)| std::cmp::Reverse(w.end_ms()));
        if live.len() > self.cfg.windows_max {
            gone.extend(live.split_off(self.cfg.windows_max));
        }
        let mut s = self.lock();
        for (k, w) in live {
            s.durable.map.insert(k, w);
        }
        gone.into_iter().map(|(k, _)| k).collect()
    }

    /// The current state of the durable windows `keys` (those still held),
    /// and the keys dropped since the last call: what to write to the store.
    pub fn durable_rows(&self, keys: &[String]) -> (Vec<WindowRow>, Vec<String>) {
        let mut s = self.lock();
        let rows = keys
            .iter()
            .filter_map(|k| s.durable.get(k).map(|w| (k.clone(), w)))
            .collect();
        (rows, s.durable.take_dropped())
    }

    /// What to write after a failed login charged to `failure_key`: its
    /// window once it holds [`FAILURES_DURABLE_FROM`] failures or more (and
    /// the keys dropped since the last write); `None` while there is nothing
    /// worth a write.
    pub fn failure_rows(&self, failure_key: &str) -> Option<(Vec<WindowRow>, Vec<String>)> {
        let mut s = self.lock();
        let w = s.durable.get(failure_key)?;
        (w.count >= FAILURES_DURABLE_FROM)
            .then(|| (vec![(failure_key.to_owned(), w)], s.durable.take_dropped()))
    }

    /// A one-time code is about to be sent to `ident` (a store key) for a
    /// client at `ip`: charges both hourly budgets, or refuses.
    ///
    /// # Errors
    /// The IP's or the identifier's budget is spent.
    pub fn charge_otp(&self, ip: IpAddr, ident: &str, now_ms: u64) -> Result<OtpCharge, Refused> {
        let c = &self.cfg;
        let keys = [
            format!("{OTP_IP}{}", ip_key(ip)),
            format!("{OTP_IDENT}{ident}"),
        ];
        let mut s = self.lock();
        s.durable.check(
            &keys[0],
            c.otp_per_ip,
            "too many codes requested from this address",
            now_ms,
        )?;
        s.durable.check(
            &keys[1],
            c.otp_per_identifier,
            "too many codes requested for this identifier",
            now_ms,
        )?;
        for k in &keys {
            s.durable.charge(k, c.otp_window_ms, now_ms);
        }
        Ok(OtpCharge { keys })
    }

    /// The code was not sent after all.
    pub fn refund_otp(&self, charge: &OtpCharge, now_ms: u64) {
        let mut s = self.lock();
        for k in &charge.keys {
            s.durable.refund(k, now_ms);
        }
    }

    /// Admits a password check (Login by password when `ident` is given,
    /// SetPassword otherwise) from `ip` to the hashing pool, or refuses it.
    /// For a login it counts a failure for `ident` at once; a successful
    /// login takes it back ([`Limits::password_ok`]).
    ///
    /// # Errors
    /// Which limit refused, and when a retry can be admitted.
    pub fn admit_password(
        self: &Arc<Self>,
        ip: IpAddr,
        ident: Option<&str>,
        now_ms: u64,
    ) -> Result<HashTicket, Refused> {
        let c = &self.cfg;
        let ip = ip_key(ip);
        let failure_key = ident.map(|i| format!("{PASSWORD_FAILURES}{i}"));
        let ip_window_key = format!("password-ip:{ip}");
        let mut s = self.lock();
        if let Some(k) = &failure_key {
            s.durable.check(
                k,
                c.password_failures_per_identifier,
                "too many failed password logins for this identifier",
                now_ms,
            )?;
        }
        // How long until the checks ahead are done (all threads busy).
        let drain_ms = s
            .hash_ms
            .saturating_mul(u64::from(s.hashing.div_ceil(c.hash_threads.max(1))).max(1));
        if s.hashing_per_ip.get(&ip).copied().unwrap_or(0) >= c.password_inflight_per_ip {
            return Err(Refused {
                reason: "too many password checks in progress from this address",
                retry_after_ms: drain_ms,
            });
        }
        s.volatile.check(
            &ip_window_key,
            c.password_per_ip_per_minute,
            "too many password attempts from this address",
            now_ms,
        )?;
        if s.hashing >= c.password_queue_max {
            return Err(Refused {
                reason: "the server is checking too many passwords",
                retry_after_ms: drain_ms,
            });
        }
        let wait = s.bucket.wait_ms(now_ms);
        if wait > 0 {
            return Err(Refused {
                reason: "the server is checking passwords at its limit rate",
                retry_after_ms: wait,
            });
        }
        s.bucket.take();
        s.volatile.charge(&ip_window_key, MINUTE_MS, now_ms);
        if let Some(k) = &failure_key {
            s.durable.charge(k, c.password_failure_window_ms, now_ms);
        }
        s.hashing += 1;
        *s.hashing_per_ip.entry(ip.clone()).or_insert(0) += 1;
        drop(s);
        Ok(HashTicket {
            limits: self.clone(),
            ip,
            failure_key,
        })
    }

    /// The login charged to `failure_key` (a ticket's
    /// [`HashTicket::failure_key`]) succeeded: it was not a failure.
    pub fn password_ok(&self, failure_key: &str, now_ms: u64) {
        self.lock().durable.refund(failure_key, now_ms);
    }

    /// Charges a DiscoverContacts request of `user_id` for the numbers
    /// (32-byte hashes) it has not looked up in its current window, or
    /// refuses the whole request. Returns how many were new.
    ///
    /// # Errors
    /// The user's budget cannot take the new numbers.
    pub fn charge_discover<'a>(
        &self,
        user_id: u64,
        hashes: impl IntoIterator<Item = &'a [u8]>,
        now_ms: u64,
    ) -> Result<u32, Refused> {
        let c = &self.cfg;
        self.lock().lookups.charge(
            user_id,
            hashes,
            c.discover_numbers_per_user,
            c.discover_window_ms,
            now_ms,
        )
    }

    /// Password checks admitted and not finished.
    #[must_use]
    pub fn hashing(&self) -> u32 {
        self.lock().hashing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const HOUR_MS: u64 = 3600 * 1000;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            otp_per_ip: 3,
            otp_per_identifier: 2,
            otp_window_ms: HOUR_MS,
            password_failures_per_identifier: 5,
            password_failure_window_ms: HOUR_MS,
            password_per_ip_per_minute: 4,
            password_inflight_per_ip: 2,
            password_queue_max: 3,
            password_per_sec: 10,
            password_burst: 10,
            hash_threads: 1,
            discover_numbers_per_user: 2,
            discover_window_ms: HOUR_MS,
            discover_numbers_remembered_max: 1000,
            windows_max: 100,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn fixed_windows_refuse_until_they_end() {
        let mut w = Windows::new(100);
        for t in [0, 10] {
            w.check("k", 2, "r", t).unwrap();
            w.charge("k", 1000, t);
        }
        assert_eq!(
            w.check("k", 2, "r", 20),
            Err(Refused {
                reason: "r",
                retry_after_ms: 980
            })
        );
        // A refund makes room again; at the window's end it starts afresh.
        w.refund("k", 30);
        w.check("k", 2, "r", 30).unwrap();
        w.charge("k", 1000, 30);
        assert!(w.check("k", 2, "r", 999).is_err());
        w.check("k", 2, "r", 1000).unwrap();
        assert_eq!(w.charge("k", 1000, 1000).count, 1);
        assert_eq!(w.get("k").unwrap().start_ms, 1000);
    }

    #[test]
    fn windows_are_bounded_dropping_expired_then_soonest_ending() {
        let mut w = Windows::new(32);
        for i in 0..32u64 {
            // Keys 0..16 end at 100, the others at 10_000 + i.
            let window = if i < 16 { 100 } else { 10_000 + i };
            w.charge(&format!("k{i}"), window, 0);
        }
        assert_eq!(w.len(), 32);
        // A new key at t=200: the 16 expired windows go.
        w.charge("new", 10_000, 200);
        assert_eq!(w.len(), 17);
        let mut dropped = w.take_dropped();
        dropped.sort();
        assert_eq!(dropped.len(), 16);
        assert!(dropped.iter().all(|k| k[1..].parse::<u64>().unwrap() < 16));
        for i in 0..15 {
            w.charge(&format!("m{i}"), 20_000, 300);
        }
        assert_eq!(w.len(), 32);
        // Full of live windows: the 3 that end soonest (k16, k17, k18) go.
        w.charge("last", 20_000, 400);
        assert_eq!(w.take_dropped(), ["k16", "k17", "k18"]);
        assert_eq!(w.len(), 30);
        assert!(w.get("last").is_some() && w.get("k19").is_some());
    }

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(10, 2);
        assert_eq!(b.wait_ms(0), 0);
        b.take();
        assert_eq!(b.wait_ms(0), 0);
        b.take();
        // Empty: a token every 100 ms.
        assert_eq!(b.wait_ms(0), 100);
        assert_eq!(b.wait_ms(40), 60);
        assert_eq!(b.wait_ms(100), 0);
        b.take();
        // Never more than the burst saved.
        assert_eq!(b.wait_ms(60_000), 0);
        b.take();
        b.take();
        assert_eq!(b.wait_ms(60_000), 100);
    }

    #[test]
    fn otp_budgets_per_ip_and_per_identifier() {
        let l = Limits::new(cfg(), 10);
        let a = l.charge_otp(ip(1), "email:a@x.org", 0).unwrap();
        assert_eq!(a.keys(), ["otp-ip:10.0.0.1", "otp-ident:email:a@x.org"]);
        l.charge_otp(ip(1), "email:a@x.org", 1000).unwrap();
        // The identifier's budget (2) is spent; the IP's (3) is not.
        let e = l.charge_otp(ip(2), "email:a@x.org", 2000).unwrap_err();
        assert_eq!(
            e,
            Refused {
                reason: "too many codes requested for this identifier",
                retry_after_ms: HOUR_MS - 2000
            }
        );
        // A refused request charges nothing: ip(2) still has its 3.
        for n in 0..3 {
            l.charge_otp(ip(2), &format!("email:{n}@x.org"), 3000)
                .unwrap();
        }
        let e = l.charge_otp(ip(2), "email:z@x.org", 4000).unwrap_err();
        assert_eq!(e.reason, "too many codes requested from this address");
        // ip(2)'s window started at 3000.
        assert_eq!(e.retry_after_ms, HOUR_MS + 3000 - 4000);
        // A refund gives one back.
        let c = l.charge_otp(ip(1), "email:b@x.org", 5000).unwrap();
        assert!(l.charge_otp(ip(1), "email:c@x.org", 5000).is_err());
        l.refund_otp(&c, 5000);
        l.charge_otp(ip(1), "email:c@x.org", 5000).unwrap();
        // What to persist: the windows' current state.
        let (rows, dropped) = l.durable_rows(a.keys());
        assert!(dropped.is_empty());
        assert_eq!(
            rows[0],
            (
                "otp-ip:10.0.0.1".to_owned(),
                Window {
                    start_ms: 0,
                    window_ms: HOUR_MS,
                    count: 3
                }
            )
        );
        assert_eq!(rows[1].1.count, 2);
    }

    #[test]
    fn loading_keeps_live_windows_and_deletes_the_rest() {
        let mut c = cfg();
        c.windows_max = 2;
        let l = Limits::new(c, 10);
        let w = |start_ms, count| Window {
            start_ms,
            window_ms: HOUR_MS,
            count,
        };
        let mut gone = l.load(
            vec![
                ("otp-ip:10.0.0.1".into(), w(1000, 3)),
                ("otp-ip:10.0.0.2".into(), w(0, 1)),   // expired
                ("otp-ip:10.0.0.3".into(), w(500, 1)), // oldest beyond the cap
                ("otp-ip:10.0.0.4".into(), w(900, 1)),
            ],
            HOUR_MS + 1,
        );
        gone.sort();
        assert_eq!(gone, ["otp-ip:10.0.0.2", "otp-ip:10.0.0.3"]);
        // The loaded window refuses with what is left of it.
        let e = l
            .charge_otp(ip(1), "email:a@x.org", HOUR_MS + 1)
            .unwrap_err();
        assert_eq!(e.retry_after_ms, 1000 - 1);
    }

    #[test]
    fn password_admission_order_and_release() {
        let l = Arc::new(Limits::new(cfg(), 40));
        let t1 = l.admit_password(ip(1), Some("email:a@x.org"), 0).unwrap();
        let t2 = l.admit_password(ip(1), Some("email:b@x.org"), 0).unwrap();
        // Two in progress from ip(1): a third waits for them (2 hashes of 40 ms).
        let e = l.admit_password(ip(1), None, 0).unwrap_err();
        assert_eq!(
            e,
            Refused {
                reason: "too many password checks in progress from this address",
                retry_after_ms: 80
            }
        );
        // Another address is admitted until the queue (3) is full.
        let t3 = l.admit_password(ip(2), None, 0).unwrap();
        let e = l.admit_password(ip(3), None, 0).unwrap_err();
        assert_eq!(e.reason, "the server is checking too many passwords");
        assert_eq!(e.retry_after_ms, 120);
        assert_eq!(l.hashing(), 3);
        // A finished hash frees its place and feeds the estimate.
        t1.hashed_in_ms(80);
        drop(t1);
        assert_eq!(l.hashing(), 2);
        let t4 = l.admit_password(ip(1), None, 0).unwrap();
        // (40 * 3 + 80) / 4 = 50 ms per hash, 3 in the queue.
        let e = l.admit_password(ip(3), None, 0).unwrap_err();
        assert_eq!(e.retry_after_ms, 150);
        drop((t2, t3, t4));
        assert_eq!(l.hashing(), 0);
        // ip(1) has had 3 checks this minute; its fourth is the last.
        let t = l.admit_password(ip(1), None, 1000).unwrap();
        drop(t);
        let e = l.admit_password(ip(1), None, 2000).unwrap_err();
        assert_eq!(
            e,
            Refused {
                reason: "too many password attempts from this address",
                retry_after_ms: MINUTE_MS - 2000
            }
        );
        assert!(l.admit_password(ip(1), None, MINUTE_MS).is_ok());
    }

    #[test]
    fn the_global_rate_refuses_with_the_time_to_the_next_token() {
        let mut c = cfg();
        c.password_per_sec = 2;
        c.password_burst = 2;
        c.password_queue_max = 100;
        let l = Arc::new(Limits::new(c, 10));
        for n in 0..2 {
            drop(l.admit_password(ip(n), None, 1000).unwrap());
        }
        let e = l.admit_password(ip(9), None, 1100).unwrap_err();
        assert_eq!(
            e,
            Refused {
                reason: "the server is checking passwords at its limit rate",
                retry_after_ms: 400
            }
        );
        // Refused checks charged nothing: ip(9) is admitted once a token is back.
        drop(l.admit_password(ip(9), None, 1500).unwrap());
    }

    #[test]
    fn failed_logins_are_counted_per_identifier_known_or_not() {
        let mut c = cfg();
        c.password_queue_max = 10;
        let l = Arc::new(Limits::new(c, 10));
        let id = "email:victim@x.org";
        // Five checks from five addresses: each counts as a failure until it
        // is known to have succeeded.
        let mut tickets = Vec::new();
        for n in 0..5 {
            let now = u64::from(n) * 1000;
            let t = l.admit_password(ip(n), Some(id), now).unwrap();
            assert_eq!(
                t.failure_key(),
                Some("password-failures:email:victim@x.org")
            );
            tickets.push(t);
        }
        let e = l.admit_password(ip(7), Some(id), 5000).unwrap_err();
        assert_eq!(
            e,
            Refused {
                reason: "too many failed password logins for this identifier",
                retry_after_ms: HOUR_MS - 5000
            }
        );
        // One succeeded: it is not a failure, and another check is admitted.
        l.password_ok(tickets[0].failure_key().unwrap(), 6000);
        let t = l.admit_password(ip(7), Some(id), 6000).unwrap();
        let (rows, _) = l.failure_rows(t.failure_key().unwrap()).unwrap();
        assert_eq!(rows[0].1.count, 5);
        // A first failure is not worth a write; a second is.
        let one = l
            .admit_password(ip(9), Some("email:once@x.org"), 6000)
            .unwrap();
        assert!(l.failure_rows(one.failure_key().unwrap()).is_none());
        drop(one);
        let two = l
            .admit_password(ip(9), Some("email:once@x.org"), 7000)
            .unwrap();
        let (rows, _) = l.failure_rows(two.failure_key().unwrap()).unwrap();
        assert_eq!(rows[0].1.count, FAILURES_DURABLE_FROM);
        // Other identifiers are not affected.
        drop(tickets);
        assert!(
            l.admit_password(ip(8), Some("email:other@x.org"), 6000)
                .is_ok()
        );
    }

    #[test]
    fn discover_budget_per_user_in_new_numbers() {
        let l = Limits::new(cfg(), 10);
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert_eq!(l.charge_discover(1, [&a[..], &b[..]], 0), Ok(2));
        // Asked again: free, however often.
        for t in 0..50 {
            assert_eq!(l.charge_discover(1, [&a[..]], t), Ok(0));
        }
        assert_eq!(
            l.charge_discover(1, [&c[..]], 100)
                .unwrap_err()
                .retry_after_ms,
            HOUR_MS - 100
        );
        assert_eq!(l.charge_discover(2, [&c[..]], 100), Ok(1));
    }

    #[test]
    fn addresses_are_limited_per_ipv4_and_per_ipv6_slash_64() {
        assert_eq!(ip_key(ip(1)), "10.0.0.1");
        let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip_key(v6("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
        assert_eq!(
            ip_key(v6("2001:db8:1:2:bbbb::2")),
            ip_key(v6("2001:db8:1:2::9"))
        );
        assert_ne!(ip_key(v6("2001:db8:1:3::1")), ip_key(v6("2001:db8:1:2::1")));
        assert_eq!(ip_key(v6("::ffff:10.0.0.1")), "10.0.0.1");
    }
}
