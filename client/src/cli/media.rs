//! `send --file` and `download`: media transfers with a progress bar on stderr (files of at
//! least [`BAR_BYTES_MIN`], never with `--json`, whose stdout carries one JSON line).

use std::io::Write as _;
use std::path::Path;

use serde_json::json;
use starling_client::{Client, ClientError, json as sj, media::Progress};

use super::messaging::target;
use super::out::Out;

/// Files smaller than this get no progress bar.
const BAR_BYTES_MIN: u64 = 1024 * 1024;

/// A progress callback: a bar on stderr for large transfers, nothing otherwise.
fn bar(out: &Out, what: &'static str) -> Progress {
    let quiet = out.json;
    let mut last = u64::MAX;
    Box::new(move |done: u64, total: u64| {
        if quiet || total < BAR_BYTES_MIN {
            return;
        }
        let pct = done.saturating_mul(100) / total.max(1);
        if pct == last {
            return;
        }
        last = pct;
        let filled = usize::try_from(pct / 5).unwrap_or(20);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r{what} [{}{}] {pct:>3}% {:.1}/{:.1} MiB",
            "#".repeat(filled),
            " ".repeat(20 - filled.min(20)),
            done as f64 / 1_048_576.0,
            total as f64 / 1_048_576.0
        );
        if done >= total {
            let _ = writeln!(err);
        }
    })
}

pub(crate) async fn send_file(
    out: &Out,
    client: &Client,
    to: &str,
    caption: &str,
    file: &Path,
    content_type: &str,
) -> Result<(), ClientError> {
    let to = target(client, to).await?;
    let media = client
        .upload_file(file, content_type, bar(out, "upload"))
        .await?;
    let ack = client
        .send_with_media(to, "text/plain", caption.as_bytes().to_vec(), Some(&media))
        .await?;
    let mut v = sj::send_ack(&ack);
    v["media"] = sj::media_ref(&media);
    out.print(&v);
    Ok(())
}

/// What a download is of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Of {
    /// The attachment of message (conversation, seq).
    Message(u64, u64),
    /// A user's avatar.
    Avatar(u64),
}

pub(crate) async fn download(
    out: &Out,
    client: &Client,
    of: Of,
    media_id: &str,
    dest: &Path,
) -> Result<(), ClientError> {
    let progress = bar(out, "download");
    let n = match of {
        Of::Message(c, s) => {
            client
                .download_media(media_id, c, s, dest, progress)
                .await?
        }
        Of::Avatar(u) => client.download_avatar(media_id, u, dest, progress).await?,
    };
    let mut v = json!({
        "type": "downloaded",
        "media_id": media_id,
        "bytes": n,
        "path": dest.display().to_string(),
    });
    match of {
        Of::Message(c, s) => {
            v["conversation_id"] = json!(c);
            v["seq"] = json!(s);
        }
        Of::Avatar(u) => v["user_id"] = json!(u),
    }
    out.print(&v);
    Ok(())
}

pub(crate) async fn avatar(
    out: &Out,
    client: &Client,
    file: Option<&Path>,
    content_type: &str,
    clear: bool,
) -> Result<(), ClientError> {
    let prof = match file {
        Some(f) if !clear => {
            client
                .set_avatar(f, content_type, bar(out, "upload"))
                .await?
        }
        _ => {
            client
                .update_profile(starling_client::v1::UpdateProfile {
                    clear_avatar: true,
                    ..Default::default()
                })
                .await?
        }
    };
    out.print(&sj::profile(&prof));
    Ok(())
}
