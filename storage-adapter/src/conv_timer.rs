//! A conversation's disappearing-messages timer: the current setting, written before the
//! timer's entry is sequenced (like a [`crate::message_state::MessageState`]), so that the
//! expiry stamped on later messages survives a restart and outlives the entry itself (which
//! the server's retention removes in time). A conversation whose timer was never set has no
//! record. Key: conversation (big-endian).
//!
//! Encoding (version 1): `1u8 ‖ conv u128 ‖ secs u64 ‖ set_by u64 ‖ set_ts u64 ‖ set_id [16]`.

use crate::error::StorageError;
use crate::meta::{Reader, Record, Writer};
use crate::types::{ClientMsgId, ConvId, TimestampMs, UserId};

/// A conversation's current timer (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvTimer {
    /// Its conversation.
    pub conv: ConvId,
    /// The timer in seconds (0: off).
    pub secs: u64,
    /// Who set it.
    pub set_by: UserId,
    /// When the server accepted the change.
    pub set_ts: TimestampMs,
    /// The `client_msg_id` of the change that set it (a retry finds its change here).
    pub set_id: ClientMsgId,
}

impl ConvTimer {
    /// The key of `conv`'s record.
    pub fn key_of(conv: ConvId) -> Vec<u8> {
        conv.0.to_be_bytes().to_vec()
    }
}

impl Record for ConvTimer {
    const TABLE: &'static str = "conv_timers";

    fn key(&self) -> Vec<u8> {
        ConvTimer::key_of(self.conv)
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(1)
            .u128(self.conv.0)
            .u64(self.secs)
            .u64(self.set_by.0)
            .u64(self.set_ts.0)
            .raw(&self.set_id.0);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        r.version(1)?;
        Ok(ConvTimer {
            conv: ConvId(r.u128()?),
            secs: r.u64()?,
            set_by: UserId(r.u64()?),
            set_ts: TimestampMs(r.u64()?),
            set_id: ClientMsgId(r.arr16()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{decode, encode};

    fn sample() -> ConvTimer {
        ConvTimer {
            conv: ConvId(7),
            secs: 86_400,
            set_by: UserId(3),
            set_ts: TimestampMs(1_790_000_000_000),
            set_id: ClientMsgId([9; 16]),
        }
    }

    #[test]
    fn a_timer_reads_back_as_it_was_written() {
        let b = encode(&sample());
        assert_eq!(decode::<ConvTimer>(&b).unwrap(), sample());
        assert_eq!(sample().key(), 7u128.to_be_bytes().to_vec());
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let b = encode(&sample());
        for cut in 0..b.len() {
            assert!(decode::<ConvTimer>(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(decode::<ConvTimer>(&v2).is_err(), "an unknown version");
        let mut longer = b;
        longer.push(0);
        assert!(decode::<ConvTimer>(&longer).is_err(), "trailing bytes");
    }
}
