//! The end-to-end key directory's requests (feature `e2e_keys`). Its pushes arrive as
//! [`Event::PrekeyCount`](crate::Event::PrekeyCount) (this device's stock ran low: upload
//! more) and [`Event::DeviceListChanged`](crate::Event::DeviceListChanged) (a peer's devices
//! changed: fetch new bundles before the next message), on every connection after the first
//! call here (the driver restores it with an empty `UploadKeys` on each new connection). Key
//! material: [`crate::e2e`].

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::error::ClientError;

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
        self.sticky().keys_pushes = true;
        let req = Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id,
            device_ids: device_ids.to_vec(),
        });
        match self.request(req).await? {
            Body::KeyBundles(k) => Ok(k.bundles),
            other => Err(ClientError::unexpected("KeyBundles", Some(&other))),
        }
    }
}

impl Client {
    /// Sends `text` end to end encrypted to user `to` (`protocol/README.md`, "End-to-end
    /// encrypted messages (client convention)"): fetches the bundles of its devices and of
    /// this user's other devices, seals one container with `keys` (stored sessions reused,
    /// new ones from verified bundles), saves `keys` to `profile_dir` before sending and again
    /// with the sent plaintext kept for `history`.
    ///
    /// # Errors
    /// No device to encrypt for; the server's refusal; a connection or profile error.
    pub async fn send_encrypted(
        &self,
        keys: &mut crate::e2e::DeviceKeys,
        profile_dir: &std::path::Path,
        to: u64,
        text: &str,
    ) -> Result<(v1::SendAck, crate::e2e::olm::Sealed), ClientError> {
        let mut bundles = self.fetch_key_bundles(to, &[]).await?;
        if to != self.user_id() {
            bundles.extend(
                self.fetch_key_bundles(self.user_id(), &[])
                    .await?
                    .into_iter()
                    .filter(|b| b.device_id != self.device_id()),
            );
        }
        let mut sealed = keys.seal((self.user_id(), self.device_id()), &bundles, text)?;
        keys.save(profile_dir)?;
        let body = std::mem::take(&mut sealed.body);
        let ack = self
            .send(crate::Target::User(to), crate::e2e::olm::CONTENT_TYPE, body)
            .await?;
        keys.remember_sent(ack.conversation_id, ack.seq, text);
        keys.save(profile_dir)?;
        Ok((ack, sealed))
    }

    /// Opens a received message with this device's `keys` (see
    /// [`DeviceKeys::open`](crate::e2e::DeviceKeys::open)); save `keys` afterwards.
    pub fn open_message(
        &self,
        keys: &mut crate::e2e::DeviceKeys,
        m: &v1::Message,
    ) -> crate::e2e::olm::Opened {
        keys.open((self.user_id(), self.device_id()), m)
    }
}
