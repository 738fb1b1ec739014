//! The current state of one message that was changed after it was stored: deleted for
//! everyone, its latest edit, its reactions. The message's entry in the log never changes; this
//! record is what the router overlays on it when it serves the message again (history, sync).
//! A message that was never changed has no record. Key: conversation ‖ seq (big-endian), so a
//! conversation's records are one prefix.
//!
//! Encoding (version 1): `1u8 ‖ conv u128 ‖ seq u64 ‖ deleted_by u64 ‖ deleted_ts u64 ‖
//! deleted_id [16] ‖ edited u8 (0|1) [‖ content type ‖ body ‖ edited_ts u64 ‖ edit_id [16]] ‖
//! u32 reaction count ‖ (user u64 ‖ emoji ‖ changed_id [16])*`. The decoder is bounds-checked and
//! refuses a reaction count the remaining bytes cannot hold, so damaged bytes are an error,
//! never a panic or a huge allocation.

use crate::error::StorageError;
use crate::meta::{Reader, Record, Writer};
use crate::types::{ClientMsgId, ConvId, Seq, TimestampMs, UserId};

/// The latest edit of a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edit {
    /// Its content type.
    pub content_type: String,
    /// Its body (opaque, like a message's).
    pub body: Vec<u8>,
    /// When the server accepted it.
    pub ts: TimestampMs,
    /// The `client_msg_id` of the change that made it.
    pub id: ClientMsgId,
}

/// One user's reaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaction {
    /// Who reacted.
    pub user: UserId,
    /// The reaction (never empty: removing one removes the record's line).
    pub emoji: String,
    /// The `client_msg_id` of the change that set it.
    pub id: ClientMsgId,
}

/// A changed message's state (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageState {
    /// Its conversation.
    pub conv: ConvId,
    /// Its seq.
    pub seq: Seq,
    /// Who deleted it for everyone ([`UserId`] 0: not deleted).
    pub deleted_by: UserId,
    /// When it was deleted.
    pub deleted_ts: TimestampMs,
    /// The `client_msg_id` of the delete.
    pub deleted_id: ClientMsgId,
    /// Its latest edit (dropped when it is deleted).
    pub edit: Option<Edit>,
    /// Reactions, one per user, ascending user (dropped when it is deleted).
    pub reactions: Vec<Reaction>,
}

impl MessageState {
    /// The state of a message that was never changed.
    pub fn new(conv: ConvId, seq: Seq) -> MessageState {
        MessageState {
            conv,
            seq,
            deleted_by: UserId(0),
            deleted_ts: TimestampMs(0),
            deleted_id: ClientMsgId::NONE,
            edit: None,
            reactions: Vec::new(),
        }
    }

    /// Whether it was deleted for everyone.
    pub fn is_deleted(&self) -> bool {
        self.deleted_by.0 != 0
    }

    /// The key of the record of `conv`'s message `seq`.
    pub fn key_of(conv: ConvId, seq: Seq) -> Vec<u8> {
        let mut k = Vec::with_capacity(24);
        k.extend_from_slice(&conv.0.to_be_bytes());
        k.extend_from_slice(&seq.0.to_be_bytes());
        k
    }
}

/// The smallest encoding of one reaction: user, emoji length, id.
const REACTION_BYTES_MIN: usize = 8 + 4 + 16;

impl Record for MessageState {
    const TABLE: &'static str = "message_states";

    fn key(&self) -> Vec<u8> {
        MessageState::key_of(self.conv, self.seq)
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(1)
            .u128(self.conv.0)
            .u64(self.seq.0)
            .u64(self.deleted_by.0)
            .u64(self.deleted_ts.0)
            .raw(&self.deleted_id.0);
        match &self.edit {
            None => {
                w.u8(0);
            }
            Some(e) => {
                w.u8(1)
                    .bytes(e.content_type.as_bytes())
                    .bytes(&e.body)
                    .u64(e.ts.0)
                    .raw(&e.id.0);
            }
        }
        w.u32(self.reactions.len() as u32);
        for r in &self.reactions {
            w.u64(r.user.0).bytes(r.emoji.as_bytes()).raw(&r.id.0);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        r.version(1)?;
        let mut s = MessageState {
            conv: ConvId(r.u128()?),
            seq: Seq(r.u64()?),
            deleted_by: UserId(r.u64()?),
            deleted_ts: TimestampMs(r.u64()?),
            deleted_id: ClientMsgId(r.arr16()?),
            edit: None,
            reactions: Vec::new(),
        };
        if r.bool()? {
            s.edit = Some(Edit {
                content_type: r.string()?,
                body: r.bytes()?,
                ts: TimestampMs(r.u64()?),
                id: ClientMsgId(r.arr16()?),
            });
        }
        let n = r.u32()? as usize;
        if n > r.remaining() / REACTION_BYTES_MIN {
            return Err(StorageError::Decode {
                table: Self::TABLE,
                reason: format!("{n} reactions cannot fit in {} bytes", r.remaining()),
            });
        }
        s.reactions.reserve(n);
        for _ in 0..n {
            s.reactions.push(Reaction {
                user: UserId(r.u64()?),
                emoji: r.string()?,
                id: ClientMsgId(r.arr16()?),
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{decode, encode};

    fn sample() -> MessageState {
        MessageState {
            edit: Some(Edit {
                content_type: "text/plain".into(),
                body: b"fixed".to_vec(),
                ts: TimestampMs(5),
                id: ClientMsgId([3; 16]),
            }),
            reactions: vec![
                Reaction {
                    user: UserId(2),
                    emoji: "👍".into(),
                    id: ClientMsgId([4; 16]),
                },
                Reaction {
                    user: UserId(9),
                    emoji: "🎉".into(),
                    id: ClientMsgId([5; 16]),
                },
            ],
            ..MessageState::new(ConvId(7), Seq(12))
        }
    }

    #[test]
    fn a_state_reads_back_as_it_was_written() {
        for s in [
            sample(),
            MessageState::new(ConvId(1), Seq(1)),
            MessageState {
                deleted_by: UserId(4),
                deleted_ts: TimestampMs(8),
                deleted_id: ClientMsgId([6; 16]),
                ..MessageState::new(ConvId(u128::MAX), Seq(u64::MAX))
            },
        ] {
            let b = encode(&s);
            assert_eq!(decode::<MessageState>(&b).unwrap(), s);
        }
        assert!(!sample().is_deleted());
        assert_eq!(sample().key(), MessageState::key_of(ConvId(7), Seq(12)));
        assert!(sample().key().starts_with(&7u128.to_be_bytes()));
    }

    #[test]
    fn damaged_bytes_are_an_error_not_a_panic() {
        let b = encode(&sample());
        for cut in 0..b.len() {
            assert!(decode::<MessageState>(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = b.clone();
        v2[0] = 2;
        assert!(decode::<MessageState>(&v2).is_err(), "an unknown version");
        // A reaction count far beyond the bytes left is refused before anything is allocated.
        let mut s = MessageState::new(ConvId(1), Seq(1));
        s.reactions.clear();
        let mut b = encode(&s);
        let n = b.len() - 4;
        b[n..].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode::<MessageState>(&b).unwrap_err().to_string();
        assert!(e.contains("reactions cannot fit"), "{e}");
    }
}
