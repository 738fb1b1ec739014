//! Protocol limits. Units and qualifiers come last in names
//! (`frame_bytes_max`); relations between them are checked at compile time.

/// Largest frame accepted before `Welcome` negotiates another limit.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 64 * 1024;

/// No peer may negotiate a larger frame limit than this: media never travels
/// in frames, so 1 MiB leaves room for large sync pages and key bundles.
pub const FRAME_BYTES_MAX_CEILING: u32 = 1024 * 1024;

/// Smallest frame limit a peer may negotiate: room for every control frame.
pub const FRAME_BYTES_MAX_FLOOR: u32 = 1024;

/// The length prefix is a LEB128 varint of at most this many bytes.
pub const LENGTH_PREFIX_BYTES_MAX: usize = 5;

/// Default largest message body in `Send`.
pub const BODY_BYTES_MAX_DEFAULT: u32 = 60 * 1024;

/// Length of `client_msg_id` in bytes.
pub const CLIENT_MSG_ID_BYTES: usize = 16;

/// Shortest disappearing-messages timer (`DisappearingTimer.seconds`, 0 aside: off), in
/// seconds. Shorter timers would expire a message before a device online at the time could
/// show it.
pub const DISAPPEARING_TIMER_SECS_MIN: u64 = 5;

/// Longest disappearing-messages timer, in seconds: one year.
pub const DISAPPEARING_TIMER_SECS_MAX: u64 = 365 * 24 * 3600;

const _: () = assert!(DISAPPEARING_TIMER_SECS_MIN > 0);
const _: () = assert!(DISAPPEARING_TIMER_SECS_MIN < DISAPPEARING_TIMER_SECS_MAX);
// An expiry in ms (server ts + timer) never overflows for any ts before year 500,000,000.
const _: () = assert!(DISAPPEARING_TIMER_SECS_MAX.checked_mul(1000).is_some());

const _: () = assert!(FRAME_BYTES_MAX_FLOOR <= FRAME_BYTES_MAX_DEFAULT);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_CEILING);
// A body must fit in a default frame together with its envelope.
const _: () = assert!(BODY_BYTES_MAX_DEFAULT + 1024 <= FRAME_BYTES_MAX_DEFAULT);
// Five varint bytes carry 35 bits: every allowed length fits.
const _: () = assert!((FRAME_BYTES_MAX_CEILING as u64) < (1u64 << (7 * LENGTH_PREFIX_BYTES_MAX)));

/// Clamps a frame limit asked for by a peer into the allowed range
/// (`0` means "the default").
#[must_use]
pub fn negotiate_frame_bytes_max(requested: u32) -> u32 {
    if requested == 0 {
        FRAME_BYTES_MAX_DEFAULT
    } else {
        requested.clamp(FRAME_BYTES_MAX_FLOOR, FRAME_BYTES_MAX_CEILING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_clamps() {
        assert_eq!(negotiate_frame_bytes_max(0), FRAME_BYTES_MAX_DEFAULT);
        assert_eq!(negotiate_frame_bytes_max(1), FRAME_BYTES_MAX_FLOOR);
        assert_eq!(negotiate_frame_bytes_max(u32::MAX), FRAME_BYTES_MAX_CEILING);
        assert_eq!(negotiate_frame_bytes_max(4096), 4096);
    }
}
