//! When a conversation's messages were received by every member: the steps of its delivery
//! floor, for the server's retention "keep until every member received it, plus N"
//! (`storage.retention_after_delivery_secs`, docs/design/retention.md).
//!
//! The floor is the highest seq every member has received (the lowest of the members' delivery
//! cursors, each the highest of the member's devices). Its owner records a step `(seq, at)`
//! when the floor has risen, at most one step per granularity, in the same metadata job that
//! makes the cursors it comes from durable. Every entry up to a step's seq was received by
//! everyone at or before its `at` ([`ConvDelivered::delivered_at`]); a step is written after
//! the fact, so the time it gives is never earlier than the real one, only later.
//! A conversation whose floor never rose has no record. Key: conversation (big-endian).
//!
//! Encoding (version 1): `1u8 ‖ conv u128 ‖ n u32 ‖ n × (seq u64 ‖ at_ms u64)`, steps in
//! ascending order of both.

use crate::error::StorageError;
use crate::meta::{Reader, Record, Writer};
use crate::types::ConvId;

/// Most steps one record keeps (older ones are folded into the next: later, never earlier).
pub const DELIVERED_STEPS_MAX: usize = 32;

/// A conversation's delivery-floor steps (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvDelivered {
    /// Its conversation.
    pub conv: ConvId,
    /// `(seq, at_ms)`: every entry up to `seq` was received by every member by `at_ms`.
    /// Ascending in both.
    pub steps: Vec<(u64, u64)>,
}

impl ConvDelivered {
    /// The key of `conv`'s record.
    pub fn key_of(conv: ConvId) -> Vec<u8> {
        conv.0.to_be_bytes().to_vec()
    }

    /// When every member had received entry `seq` (ms since the epoch), if they have.
    pub fn delivered_at(steps: &[(u64, u64)], seq: u64) -> Option<u64> {
        let i = steps.partition_point(|&(s, _)| s < seq);
        steps.get(i).map(|&(_, at)| at)
    }

    /// `steps` with the floor at `floor` as of `now_ms`, or `None` if nothing is to be
    /// recorded now: the floor did not rise, or (`granularity_ms`) the last step is too recent
    /// (the caller asks again later). Steps whose successor is past `forget_after_ms` (every
    /// entry up to it is gone anyway) are folded into that successor, and past
    /// [`DELIVERED_STEPS_MAX`] the oldest one is: both move entries to a later time only.
    pub fn advanced(
        steps: &[(u64, u64)],
        floor: u64,
        now_ms: u64,
        granularity_ms: u64,
        forget_after_ms: u64,
    ) -> Option<Vec<(u64, u64)>> {
        if let Some(&(s, at)) = steps.last() {
            if floor <= s || now_ms < at.saturating_add(granularity_ms) {
                return None;
            }
        } else if floor == 0 {
            return None;
        }
        let mut v = steps.to_vec();
        v.push((floor, now_ms.max(steps.last().map_or(0, |l| l.1))));
        while v.len() >= 2 && v[1].1.saturating_add(forget_after_ms) <= now_ms {
            v.remove(0);
        }
        while v.len() > DELIVERED_STEPS_MAX {
            v.remove(0);
        }
        Some(v)
    }

    /// Whether the floor stands higher than the last step (a step is due once the granularity
    /// allows).
    pub fn behind(steps: &[(u64, u64)], floor: u64) -> bool {
        floor > steps.last().map_or(0, |s| s.0)
    }
}

impl Record for ConvDelivered {
    const TABLE: &'static str = "conv_delivered";

    fn key(&self) -> Vec<u8> {
        ConvDelivered::key_of(self.conv)
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(1).u128(self.conv.0);
        w.u32(u32::try_from(self.steps.len()).unwrap_or(u32::MAX));
        for &(s, at) in &self.steps {
            w.u64(s).u64(at);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        r.version(1)?;
        let conv = ConvId(r.u128()?);
        let n = r.u32()? as usize;
        if n > DELIVERED_STEPS_MAX {
            return Err(StorageError::Decode {
                table: Self::TABLE,
                reason: format!("{n} steps, at most {DELIVERED_STEPS_MAX}"),
            });
        }
        let mut steps: Vec<(u64, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let step = (r.u64()?, r.u64()?);
            if steps.last().is_some_and(|l| l.0 >= step.0 || l.1 > step.1) {
                return Err(StorageError::Decode {
                    table: Self::TABLE,
                    reason: "steps out of order".into(),
                });
            }
            steps.push(step);
        }
        Ok(ConvDelivered { conv, steps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{decode, encode};

    fn sample() -> ConvDelivered {
        ConvDelivered {
            conv: ConvId(7),
            steps: vec![(3, 1_000), (9, 61_000), (10, 61_000)],
        }
    }

    #[test]
    fn steps_read_back_as_written_and_answer_when_each_seq_was_received() {
        let b = encode(&sample());
        assert_eq!(decode::<ConvDelivered>(&b).unwrap(), sample());
        let s = &sample().steps;
        assert_eq!(ConvDelivered::delivered_at(s, 1), Some(1_000));
        assert_eq!(ConvDelivered::delivered_at(s, 3), Some(1_000));
        assert_eq!(ConvDelivered::delivered_at(s, 4), Some(61_000));
        assert_eq!(ConvDelivered::delivered_at(s, 10), Some(61_000));
        assert_eq!(ConvDelivered::delivered_at(s, 11), None);
        assert_eq!(ConvDelivered::delivered_at(&[], 1), None);
    }

    #[test]
    fn a_step_is_recorded_when_the_floor_rose_and_the_granularity_allows() {
        assert_eq!(ConvDelivered::advanced(&[], 0, 5, 60, 1_000), None);
        let one = ConvDelivered::advanced(&[], 4, 5, 60, 1_000).unwrap();
        assert_eq!(one, vec![(4, 5)]);
        assert_eq!(
            ConvDelivered::advanced(&one, 4, 500, 60, 1_000),
            None,
            "no rise"
        );
        assert_eq!(
            ConvDelivered::advanced(&one, 6, 64, 60, 1_000),
            None,
            "too soon"
        );
        assert!(ConvDelivered::behind(&one, 6));
        let two = ConvDelivered::advanced(&one, 6, 65, 60, 1_000).unwrap();
        assert_eq!(two, vec![(4, 5), (6, 65)]);
        // Once a step's successor is past the window, the step folds into it.
        let three = ConvDelivered::advanced(&two, 9, 1_065, 60, 1_000).unwrap();
        assert_eq!(three, vec![(6, 65), (9, 1_065)]);
    }

    #[test]
    fn past_the_most_steps_the_oldest_folds_into_the_next_never_earlier() {
        let mut v = Vec::new();
        for i in 1..=(DELIVERED_STEPS_MAX as u64 + 5) {
            v = ConvDelivered::advanced(&v, i, i * 100, 100, u64::MAX).unwrap();
        }
        assert_eq!(v.len(), DELIVERED_STEPS_MAX);
        // Seq 1 was received at 100; the record now says a later time, never an earlier one.
        assert!(ConvDelivered::delivered_at(&v, 1).unwrap() >= 100);
        for w in v.windows(2) {
            assert!(w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        }
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let b = encode(&sample());
        for cut in 0..b.len() {
            assert!(decode::<ConvDelivered>(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(decode::<ConvDelivered>(&v2).is_err(), "an unknown version");
        let mut longer = b;
        longer.push(0);
        assert!(decode::<ConvDelivered>(&longer).is_err(), "trailing bytes");
        let bad = ConvDelivered {
            conv: ConvId(1),
            steps: vec![(5, 10), (4, 20)],
        };
        assert!(
            decode::<ConvDelivered>(&encode(&bad)).is_err(),
            "out of order"
        );
    }
}
