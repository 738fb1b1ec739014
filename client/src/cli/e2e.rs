//! End-to-end encrypted messages in the CLI: `send --e2e` and `chat --e2e`, and opening
//! received ones in `sync`, `chat`, `watch` and `history` with the device's Olm account
//! (`olm.json` in the profile, saved after each message opened or sealed, so sessions persist
//! across runs). One run holds one copy of the account, shared by what sends and what opens.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Value, json};
use starling_client::e2e::DeviceKeys;
use starling_client::e2e::olm::{CONTENT_TYPE, Opened, Sealed};
use starling_client::{Client, ClientError, Event, json as sj, v1};

use super::out::Out;

/// The account of one run, shared by the sender and the reader.
pub(crate) type SharedKeys = Arc<Mutex<DeviceKeys>>;

/// Opens messages for one CLI run.
pub(crate) struct Reader {
    dir: PathBuf,
    me: (u64, u32),
    /// The account, or why it cannot be loaded (every encrypted message says so).
    keys: Option<Result<SharedKeys, String>>,
}

impl Reader {
    pub(crate) fn new(client: &Client, dir: &Path) -> Self {
        Reader {
            dir: dir.to_path_buf(),
            me: (client.user_id(), client.device_id()),
            keys: None,
        }
    }

    /// The profile directory the account is saved in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The account, to send with: it must have been published (`keys upload`).
    ///
    /// # Errors
    /// No keys yet, or the profile's keys cannot be read.
    pub(crate) fn keys_to_send(&mut self) -> Result<SharedKeys, ClientError> {
        if !self.dir.join("olm.json").exists() {
            return Err(ClientError::InvalidArgument(
                "this device has no end-to-end keys yet: run `keys upload` first".into(),
            ));
        }
        let dir = self.dir.clone();
        self.keys
            .get_or_insert_with(|| load(&dir))
            .clone()
            .map_err(ClientError::InvalidArgument)
    }

    /// A message's JSON, opened if it is end-to-end encrypted.
    ///
    /// # Errors
    /// The profile cannot be written (the sessions would not persist).
    pub(crate) fn message(&mut self, m: &v1::Message) -> Result<Value, ClientError> {
        if m.content_type != CONTENT_TYPE {
            return Ok(sj::message(m));
        }
        let dir = self.dir.clone();
        let keys = self.keys.get_or_insert_with(|| load(&dir));
        let opened = match keys {
            Ok(k) => {
                let mut k = k.lock().unwrap_or_else(PoisonError::into_inner);
                let opened = k.open(self.me, m);
                // A fresh account (never uploaded) opens nothing: do not write it.
                if dir.join("olm.json").exists() {
                    k.save(&dir)?;
                }
                opened
            }
            Err(why) => Opened::Undecryptable(why.clone()),
        };
        Ok(sj::opened_message(m, &opened))
    }

    /// An event's JSON, its message opened.
    pub(crate) fn event(&mut self, ev: &Event) -> Result<Value, ClientError> {
        match ev {
            Event::Message(m) | Event::MessageChanged(m) => self.message(m),
            ev => Ok(sj::event(ev)),
        }
    }
}

fn load(dir: &Path) -> Result<SharedKeys, String> {
    DeviceKeys::load_or_generate(dir)
        .map(|k| Arc::new(Mutex::new(k)))
        .map_err(|e| e.to_string())
}

/// The user an end-to-end message goes to (`--to` of `send --e2e`, `--with` of `chat --e2e`).
///
/// # Errors
/// A conversation rather than a user; an unknown user.
pub(crate) async fn recipient(client: &Client, who: &str) -> Result<u64, ClientError> {
    if who.starts_with("conv:") || who.starts_with("group:") {
        return Err(ClientError::InvalidArgument(
            "--e2e sends to one user (a user id or +phone), not to a conversation".into(),
        ));
    }
    client.resolve_user(who).await
}

/// What `send --e2e` (and each line of `chat --e2e`) prints: the ack and whom it reached.
pub(crate) fn sent(ack: &v1::SendAck, sealed: &Sealed) -> Value {
    let mut v = sj::send_ack(ack);
    v["e2e"] = json!({
        "content_type": CONTENT_TYPE,
        "devices": sealed.devices.iter().map(|(u, d, new)| json!({
            "user_id": u, "device_id": d, "new_session": new,
        })).collect::<Vec<_>>(),
        "skipped": sealed.skipped.iter().map(|(u, d, why)| json!({
            "user_id": u, "device_id": d, "reason": why,
        })).collect::<Vec<_>>(),
    });
    v
}

/// `send --to USER --text T --e2e`.
pub(crate) async fn send(
    out: &Out,
    client: &Client,
    dir: &Path,
    to: &str,
    text: &str,
) -> Result<(), ClientError> {
    let to = recipient(client, to).await?;
    let keys = Reader::new(client, dir).keys_to_send()?;
    let (ack, sealed) = client.send_encrypted(&keys, dir, to, text).await?;
    out.print(&sent(&ack, &sealed));
    Ok(())
}
