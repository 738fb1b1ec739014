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

pub(crate) async fn download(
    out: &Out,
    client: &Client,
    conversation: u64,
    seq: u64,
    media_id: &str,
    dest: &Path,
) -> Result<(), ClientError> {
    let n = client
        .download_media(media_id, conversation, seq, dest, bar(out, "download"))
        .await?;
    out.print(&json!({
        "type": "downloaded",
        "media_id": media_id,
        "conversation_id": conversation,
        "seq": seq,
        "bytes": n,
        "path": dest.display().to_string(),
    }));
    Ok(())
}
