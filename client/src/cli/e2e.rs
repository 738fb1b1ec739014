//! End-to-end encrypted messages in the CLI: `send --e2e`, and opening received ones in
//! `sync`, `chat` and `history` with the device's Olm account (`olm.json` in the profile,
//! saved after each message opened, so sessions persist across runs).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use starling_client::e2e::DeviceKeys;
use starling_client::e2e::olm::{CONTENT_TYPE, Opened};
use starling_client::{Client, ClientError, Event, json as sj, v1};

use super::out::Out;

/// Opens messages for one CLI run.
pub(crate) struct Reader {
    dir: PathBuf,
    me: (u64, u32),
    /// The account, or why it cannot be loaded (every encrypted message says so).
    keys: Option<Result<DeviceKeys, String>>,
}

impl Reader {
    pub(crate) fn new(client: &Client, dir: &Path) -> Self {
        Reader {
            dir: dir.to_path_buf(),
            me: (client.user_id(), client.device_id()),
            keys: None,
        }
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
        let keys = self
            .keys
            .get_or_insert_with(|| DeviceKeys::load_or_generate(&dir).map_err(|e| e.to_string()));
        let opened = match keys {
            Ok(k) => {
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

/// `send --to USER --text T --e2e`.
pub(crate) async fn send(
    out: &Out,
    client: &Client,
    dir: &Path,
    to: &str,
    text: &str,
) -> Result<(), ClientError> {
    if to.starts_with("conv:") || to.starts_with("group:") {
        return Err(ClientError::InvalidArgument(
            "--e2e sends to one user (a user id or +phone), not to a conversation".into(),
        ));
    }
    let to = client.resolve_user(to).await?;
    let mut keys = DeviceKeys::load_or_generate(dir)?;
    if !dir.join("olm.json").exists() {
        return Err(ClientError::InvalidArgument(
            "this device has no end-to-end keys yet: run `keys upload` first".into(),
        ));
    }
    let (ack, sealed) = client.send_encrypted(&mut keys, dir, to, text).await?;
    let mut v = sj::send_ack(&ack);
    v["e2e"] = json!({
        "content_type": CONTENT_TYPE,
        "devices": sealed.devices.iter().map(|(u, d, new)| json!({
            "user_id": u, "device_id": d, "new_session": new,
        })).collect::<Vec<_>>(),
        "skipped": sealed.skipped.iter().map(|(u, d, why)| json!({
            "user_id": u, "device_id": d, "reason": why,
        })).collect::<Vec<_>>(),
    });
    out.print(&v);
    Ok(())
}
