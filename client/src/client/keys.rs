//! The end-to-end key directory's requests (feature `e2e_keys`). Its pushes arrive as
//! [`Event::PrekeyCount`](crate::Event::PrekeyCount) (this device's stock ran low: upload
//! more) and [`Event::DeviceListChanged`](crate::Event::DeviceListChanged) (a peer's devices
//! changed: fetch new bundles before the next message), on every connection after the first
//! call here (the driver restores it with an empty `UploadKeys` on each new connection). Key
//! material: [`crate::e2e`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::e2e::DeviceKeys;
use crate::e2e::olm::{CONTENT_TYPE, Sealed};
use crate::error::ClientError;

/// Most `device_ids` in one `FetchKeyBundles` (the protocol's limit).
const FETCH_DEVICE_IDS_MAX: usize = 64;

impl Client {
    /// Uploads this device's keys; returns how many one-time prekeys the server now holds.
    ///
    /// # Errors
    /// The server's refusal (`INVALID_ARGUMENT`: a bad length, signature or count;
    /// `ALREADY_EXISTS`: a key id reused with another key), or a connection error.
    pub async fn upload_keys(&self, keys: v1::UploadKeys) -> Result<u32, ClientError> {
        self.sticky().keys_pushes = true;
        match self.request(Body::UploadKeys(keys)).await? {
            Body::PrekeyCount(c) => Ok(c.one_time_prekeys),
            other => Err(ClientError::unexpected("PrekeyCount", Some(&other))),
        }
    }

    /// How many one-time prekeys the server holds for this device.
    ///
    /// # Errors
    /// A connection error.
    pub async fn prekey_count(&self) -> Result<u32, ClientError> {
        self.upload_keys(v1::UploadKeys::default()).await
    }

    /// Key bundles of `user_id`'s devices (`device_ids` empty: all), each with a one-time
    /// prekey taken from its stock while any is left. Empty for users the caller may not see.
    ///
    /// # Errors
    /// The server's refusal, or a connection error.
    pub async fn fetch_key_bundles(
        &self,
        user_id: u64,
        device_ids: &[u32],
    ) -> Result<Vec<v1::KeyBundle>, ClientError> {
        self.key_bundles(user_id, device_ids, false).await
    }

    /// Key bundles of `user_id`'s devices (`device_ids` empty: all) without one-time prekeys:
    /// a listing that takes nothing (`list_only`). Empty for users the caller may not see.
    ///
    /// # Errors
    /// The server's refusal, or a connection error.
    pub async fn list_key_bundles(
        &self,
        user_id: u64,
        device_ids: &[u32],
    ) -> Result<Vec<v1::KeyBundle>, ClientError> {
        self.key_bundles(user_id, device_ids, true).await
    }

    async fn key_bundles(
        &self,
        user_id: u64,
        device_ids: &[u32],
        list_only: bool,
    ) -> Result<Vec<v1::KeyBundle>, ClientError> {
        self.sticky().keys_pushes = true;
        let req = Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id,
            device_ids: device_ids.to_vec(),
            list_only,
        });
        match self.request(req).await? {
            Body::KeyBundles(k) => Ok(k.bundles),
            other => Err(ClientError::unexpected("KeyBundles", Some(&other))),
        }
    }
}

/// Locks the keys (a panic elsewhere while they were held leaves them usable: every change
/// to them is complete when made).
fn lock(keys: &Mutex<DeviceKeys>) -> MutexGuard<'_, DeviceKeys> {
    keys.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Client {
    /// Sends `text` end to end encrypted to user `to` (`protocol/README.md`, "End-to-end
    /// encrypted messages (client convention)"). Lists the devices of `to` and of this user
    /// (no one-time prekey taken), forgets the sessions of devices no longer listed, fetches
    /// a bundle (one one-time prekey) only for each device without a session of its listed
    /// key, seals one container with `keys` (stored sessions reused), saves `keys` to
    /// `profile_dir` before sending and again with the sent plaintext kept for `history`.
    ///
    /// `keys` may be shared with tasks that open messages: it is locked only between network
    /// round trips. Run one `send_encrypted` at a time per account, or two may each start a
    /// session with the same new device.
    ///
    /// # Errors
    /// No device to encrypt for; the server's refusal; a connection or profile error.
    pub async fn send_encrypted(
        &self,
        keys: &Mutex<DeviceKeys>,
        profile_dir: &Path,
        to: u64,
        text: &str,
    ) -> Result<(v1::SendAck, Sealed), ClientError> {
        let me = (self.user_id(), self.device_id());
        let mut users = vec![to];
        if to != me.0 {
            users.push(me.0);
        }
        let mut bundles = Vec::new();
        for user in users {
            let listed = self.list_key_bundles(user, &[]).await?;
            let need = lock(keys).reconcile(me, user, &listed);
            let mut claimed: BTreeMap<u32, v1::KeyBundle> = BTreeMap::new();
            for ids in need.chunks(FETCH_DEVICE_IDS_MAX) {
                for b in self.fetch_key_bundles(user, ids).await? {
                    claimed.insert(b.device_id, b);
                }
            }
            for b in listed {
                if (b.user_id, b.device_id) != me {
                    bundles.push(claimed.remove(&b.device_id).unwrap_or(b));
                }
            }
        }
        let mut sealed = {
            let mut k = lock(keys);
            let sealed = k.seal(me, &bundles, text)?;
            k.save(profile_dir)?;
            sealed
        };
        let body = std::mem::take(&mut sealed.body);
        let res = self
            .send(crate::Target::User(to), CONTENT_TYPE, body.clone())
            .await;
        let mut k = lock(keys);
        // Still queued: the outbox sends it later, and its own copy may yet come back.
        if !matches!(res, Err(ClientError::StillQueued { .. })) {
            k.sealed_done(&body);
        }
        let ack = res?;
        k.remember_sent(ack.conversation_id, ack.seq, text);
        k.save(profile_dir)?;
        Ok((ack, sealed))
    }

    /// Opens a received message with this device's `keys` (see
    /// [`DeviceKeys::open`](crate::e2e::DeviceKeys::open)); save `keys` afterwards.
    pub fn open_message(&self, keys: &mut DeviceKeys, m: &v1::Message) -> crate::e2e::olm::Opened {
        keys.open((self.user_id(), self.device_id()), m)
    }
}
