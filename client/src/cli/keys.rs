//! `keys upload|count|fetch`: the end-to-end key directory. The device's key material lives in
//! the profile directory (an Olm account in `olm.json`, see `starling_client::e2e`), saved
//! before an upload.

use clap::Subcommand;
use serde_json::json;
use starling_client::e2e::DeviceKeys;
use starling_client::{Client, ClientError, json as sj};

use super::messaging;
use super::out::Out;

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCmd {
    /// Upload this device's keys: the identity and signed prekey the first
    /// time (generated and kept in the profile directory), and new one-time
    /// prekeys.
    Upload {
        /// One-time prekeys to add (at most 100).
        #[arg(long = "one-time", default_value_t = 100)]
        one_time: u32,
    },
    /// How many one-time prekeys the server holds for this device.
    Count,
    /// Fetch a user's key bundles (each takes one of a device's one-time
    /// prekeys).
    Fetch {
        /// A user id or +phone.
        #[arg(long)]
        user: String,
        /// Only these devices, comma-separated.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<u32>,
    },
}

/// Runs a keys command.
pub(crate) async fn run(
    out: &Out,
    client: &Client,
    profile_dir: &std::path::Path,
    cmd: KeysCmd,
) -> Result<(), ClientError> {
    match cmd {
        KeysCmd::Upload { one_time } => {
            let mut keys = DeviceKeys::load_or_generate(profile_dir)?;
            let up = keys.next_upload(one_time)?;
            let first = !up.identity_key.is_empty();
            // The private halves are on disk before the public ones leave.
            keys.save(profile_dir)?;
            let n = client.upload_keys(up).await?;
            keys.published();
            keys.save(profile_dir)?;
            out.print(&json!({
                "type": "prekey_count",
                "one_time_prekeys": n,
                "identity_key_hex": hex::encode(keys.identity_key()),
                "published_identity": first,
            }));
        }
        KeysCmd::Count => {
            let n = client.prekey_count().await?;
            out.print(&json!({ "type": "prekey_count", "one_time_prekeys": n }));
        }
        KeysCmd::Fetch { user, devices } => {
            let uid = messaging::users(client, &[user]).await?[0];
            for b in client.fetch_key_bundles(uid, &devices).await? {
                out.print(&sj::key_bundle(&b));
            }
        }
    }
    Ok(())
}
