//! The push notifier's durable state in the metadata store: the notification outbox (one row
//! per device and conversation: the collapse unit) and the dead letters (notifications a push
//! service refused for good), behind [`PushStore`], which the embedded backend implements on
//! `meta.redb`. Devices' push tokens are account records ([`crate::meta::PushToken`], written
//! through [`crate::accounts::AccountStore`]); this module reads them for the notifier.
//!
//! Every method blocks and writes durably (fsync) before it returns: call them from the
//! notifier's thread, never from a shard thread.

use redb::{ReadableTable, ReadableTableMetadata as _, WriteTransaction};

use crate::error::StorageError;
use crate::meta::{
    EmbeddedMeta, MetadataStore as _, PushToken, Reader, Record, Writer, decode, encode, keys,
    map_table_err, table,
};
use crate::types::{DeviceId, UserId};

/// One device's pending or recently sent notification for one conversation. Key: user ‖ device
/// ‖ conversation.
///
/// Pending while `seq > sent_seq`: due at `due_ms`. Once sent (`sent_seq = seq`) the row stays
/// until the collapse interval after `sent_ms` is over, so that a later entry of the
/// conversation waits for the interval's end (one notification per device per conversation per
/// interval).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The recipient.
    pub user: UserId,
    /// The recipient's device.
    pub device: DeviceId,
    /// The conversation (wire id).
    pub conv: u64,
    /// The latest durable seq of the conversation this row was told of.
    pub seq: u64,
    /// Who sent that entry.
    pub sender: u64,
    /// When to send (ms since the epoch).
    pub due_ms: u64,
    /// The seq the last notification sent named (0: none yet).
    pub sent_seq: u64,
    /// When it was sent.
    pub sent_ms: u64,
    /// Failed attempts since the last success.
    pub attempts: u32,
}

impl OutboxEntry {
    /// The row's key.
    #[must_use]
    pub fn key_of(user: UserId, device: DeviceId, conv: u64) -> Vec<u8> {
        let mut k = keys::device(user, device);
        k.extend_from_slice(&conv.to_be_bytes());
        k
    }

    /// Whether a notification is owed.
    #[must_use]
    pub fn pending(&self) -> bool {
        self.seq > self.sent_seq
    }
}

impl Record for OutboxEntry {
    const TABLE: &'static str = "push_outbox";
    fn key(&self) -> Vec<u8> {
        Self::key_of(self.user, self.device, self.conv)
    }
    fn encode(&self, w: &mut Writer) {
        w.u64(self.user.0)
            .u32(self.device.0)
            .u64(self.conv)
            .u64(self.seq)
            .u64(self.sender)
            .u64(self.due_ms)
            .u64(self.sent_seq)
            .u64(self.sent_ms)
            .u32(self.attempts);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(OutboxEntry {
            user: UserId(r.u64()?),
            device: DeviceId(r.u32()?),
            conv: r.u64()?,
            seq: r.u64()?,
            sender: r.u64()?,
            due_ms: r.u64()?,
            sent_seq: r.u64()?,
            sent_ms: r.u64()?,
            attempts: r.u32()?,
        })
    }
}

/// A notification a push service refused for good (other than for an invalid token, which
/// removes the token instead). Key: a counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Assigned by [`PushStore::dead_letter_add`].
    pub id: u64,
    /// The recipient.
    pub user: UserId,
    /// The recipient's device.
    pub device: DeviceId,
    /// The conversation.
    pub conv: u64,
    /// The seq the notification named.
    pub seq: u64,
    /// The provider ("web_push", ...).
    pub provider: String,
    /// What the service answered.
    pub reason: String,
    /// When.
    pub at_ms: u64,
}

impl Record for DeadLetter {
    const TABLE: &'static str = "push_dead_letters";
    fn key(&self) -> Vec<u8> {
        self.id.to_be_bytes().to_vec()
    }
    fn encode(&self, w: &mut Writer) {
        w.u64(self.id)
            .u64(self.user.0)
            .u32(self.device.0)
            .u64(self.conv)
            .u64(self.seq)
            .bytes(self.provider.as_bytes())
            .bytes(self.reason.as_bytes())
            .u64(self.at_ms);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, StorageError> {
        Ok(DeadLetter {
            id: r.u64()?,
            user: UserId(r.u64()?),
            device: DeviceId(r.u32()?),
            conv: r.u64()?,
            seq: r.u64()?,
            provider: r.string()?,
            reason: r.string()?,
            at_ms: r.u64()?,
        })
    }
}

/// The notifier's durable state (see the module docs).
pub trait PushStore: Send + Sync + std::fmt::Debug {
    /// The push tokens of `user`'s devices.
    fn push_tokens(&self, user: UserId) -> Result<Vec<PushToken>, StorageError>;
    /// Removes a device's push token if it is still `token` (a push service said it is no
    /// longer valid; one registered since is kept). True if removed.
    fn push_token_remove_if(
        &self,
        user: UserId,
        device: DeviceId,
        token: &[u8],
    ) -> Result<bool, StorageError>;
    /// Every outbox row.
    fn outbox_load(&self) -> Result<Vec<OutboxEntry>, StorageError>;
    /// Puts and deletes outbox rows, in one durable transaction.
    fn outbox_write(
        &self,
        puts: &[OutboxEntry],
        deletes: &[(UserId, DeviceId, u64)],
    ) -> Result<(), StorageError>;
    /// Adds a dead letter (its id assigned here) and deletes its outbox row, in one durable
    /// transaction; returns the id.
    fn dead_letter_add(&self, letter: &DeadLetter) -> Result<u64, StorageError>;
    /// How many dead letters there are.
    fn dead_letters_count(&self) -> Result<u64, StorageError>;
}

fn put_in<R: Record>(tx: &WriteTransaction, rec: &R) -> Result<(), StorageError> {
    tx.open_table(table(R::TABLE))?
        .insert(rec.key().as_slice(), encode(rec).as_slice())?;
    Ok(())
}

fn delete_in<R: Record>(tx: &WriteTransaction, key: &[u8]) -> Result<bool, StorageError> {
    Ok(tx.open_table(table(R::TABLE))?.remove(key)?.is_some())
}

impl PushStore for EmbeddedMeta {
    fn push_tokens(&self, user: UserId) -> Result<Vec<PushToken>, StorageError> {
        self.scan::<PushToken>(&keys::user(user), usize::MAX)
    }

    fn push_token_remove_if(
        &self,
        user: UserId,
        device: DeviceId,
        token: &[u8],
    ) -> Result<bool, StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            let key = keys::device(user, device);
            let same = {
                let t = tx.open_table(table(PushToken::TABLE))?;
                let v = t.get(key.as_slice())?;
                match v {
                    Some(g) => decode::<PushToken>(g.value())?.token == token,
                    None => false,
                }
            };
            if same {
                delete_in::<PushToken>(&tx, &key)?;
                tx.commit()?;
            } else {
                tx.abort()?;
            }
            Ok(same)
        })
    }

    fn outbox_load(&self) -> Result<Vec<OutboxEntry>, StorageError> {
        self.scan::<OutboxEntry>(&[], usize::MAX)
    }

    fn outbox_write(
        &self,
        puts: &[OutboxEntry],
        deletes: &[(UserId, DeviceId, u64)],
    ) -> Result<(), StorageError> {
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        self.watch(|| {
            let tx = self.write_txn()?;
            for &(u, d, c) in deletes {
                delete_in::<OutboxEntry>(&tx, &OutboxEntry::key_of(u, d, c))?;
            }
            for e in puts {
                put_in(&tx, e)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn dead_letter_add(&self, letter: &DeadLetter) -> Result<u64, StorageError> {
        self.watch(|| {
            let tx = self.write_txn()?;
            let id = {
                let t = tx.open_table(table(DeadLetter::TABLE))?;
                let last = t.last()?;
                match last {
                    Some((_, v)) => decode::<DeadLetter>(v.value())?.id + 1,
                    None => 1,
                }
            };
            put_in(
                &tx,
                &DeadLetter {
                    id,
                    ..letter.clone()
                },
            )?;
            delete_in::<OutboxEntry>(
                &tx,
                &OutboxEntry::key_of(letter.user, letter.device, letter.conv),
            )?;
            tx.commit()?;
            Ok(id)
        })
    }

    fn dead_letters_count(&self) -> Result<u64, StorageError> {
        self.watch(|| {
            let tx = self.db_read()?;
            match tx.open_table(table(DeadLetter::TABLE)) {
                Ok(t) => Ok(t.len()?),
                Err(e) => map_table_err(e).map(|()| 0),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::AccountStore as _;
    use crate::meta::{AccountFields, User};
    use crate::types::TimestampMs;

    fn entry(user: UserId, device: DeviceId, conv: u64, seq: u64) -> OutboxEntry {
        OutboxEntry {
            user,
            device,
            conv,
            seq,
            sender: 9,
            due_ms: 100,
            sent_seq: 0,
            sent_ms: 0,
            attempts: 0,
        }
    }

    #[test]
    fn the_outbox_and_dead_letters_are_durable_and_tokens_go_only_if_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let meta = EmbeddedMeta::open(&path).unwrap();
        let (u, d) = (UserId(1), DeviceId(2));
        meta.outbox_write(
            &[
                entry(u, d, 7, 3),
                entry(u, d, 8, 1),
                entry(u, DeviceId(3), 7, 3),
            ],
            &[],
        )
        .unwrap();
        meta.outbox_write(&[entry(u, d, 7, 5)], &[(u, DeviceId(3), 7)])
            .unwrap();
        assert_eq!(meta.dead_letters_count().unwrap(), 0);
        let letter = DeadLetter {
            id: 0,
            user: u,
            device: d,
            conv: 8,
            seq: 1,
            provider: "web_push".into(),
            reason: "400 bad request".into(),
            at_ms: 5,
        };
        assert_eq!(meta.dead_letter_add(&letter).unwrap(), 1);
        assert_eq!(meta.dead_letter_add(&letter).unwrap(), 2);
        drop(meta);
        let meta = EmbeddedMeta::open(&path).unwrap();
        assert_eq!(meta.outbox_load().unwrap(), vec![entry(u, d, 7, 5)]);
        assert_eq!(meta.dead_letters_count().unwrap(), 2);

        let (ana, _) = meta
            .user_create(
                "email:ana@x.org",
                &User {
                    display_name: "ana".into(),
                    account: Some(AccountFields::default()),
                    ..User::default()
                },
                None,
            )
            .unwrap();
        let (dev, _) = meta
            .sign_in(&crate::accounts::SignIn {
                user: ana,
                device_name: "phone",
                platform: "linux",
                refresh_hash: [1; 32],
                refresh_expires: TimestampMs(10),
                now: TimestampMs(1),
            })
            .unwrap();
        let token = PushToken {
            user: ana,
            device: dev,
            provider: "fcm".into(),
            token: b"new".to_vec(),
            app_id: String::new(),
            sandbox: false,
            updated_ms: TimestampMs(1),
        };
        assert!(meta.push_token_set(&token).unwrap());
        assert_eq!(meta.push_tokens(ana).unwrap(), vec![token.clone()]);
        assert!(!meta.push_token_remove_if(ana, dev, b"old").unwrap());
        assert!(meta.push_token_remove_if(ana, dev, b"new").unwrap());
        assert!(meta.push_tokens(ana).unwrap().is_empty());
    }
}
