//! Media through the SDK and the CLI against the real binary: `send --file` uploads and sends,
//! the recipient's `sync` shows the attachment and `download` writes the same bytes; the SDK's
//! helpers do the same, and a non-member's download is refused.

use std::sync::Arc;

use starling_client::{ClientError, Target, v1::ErrorCode};

use super::contacts::register;
use super::*;

const MEDIA_TOML: &str = "[media]\nlisten = \"127.0.0.1:0\"\n";

fn file_of(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
    let p = dir.join(name);
    std::fs::write(&p, &bytes).unwrap();
    (p, bytes)
}

#[test]
fn cli_sends_a_file_and_the_recipient_downloads_it() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&bin, &tmp.path().join("data"), "127.0.0.1:0", MEDIA_TOML);
    let ana = Cli {
        server: &server,
        profile: tmp.path().join("ana"),
    };
    let ben = Cli {
        server: &server,
        profile: tmp.path().join("ben"),
    };
    let ana_id = register(&ana, "+15550300001", "Ana");
    let ben_id = register(&ben, "+15550300002", "Ben");
    let (file, bytes) = file_of(tmp.path(), "photo.png", 3 * 1024 * 1024 + 17);
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        &ben_id.to_string(),
        "--file",
        file.to_str().unwrap(),
        "--content-type",
        "image/png",
        "--text",
        "the beach",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out.len(), 1, "--json prints one line: {out:?}");
    assert_eq!(out[0]["type"], "sent");
    let media_id = out[0]["media"]["media_id"].as_str().unwrap().to_owned();
    assert_eq!(
        media_id,
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
    );
    let (conv, seq) = (
        out[0]["conversation_id"].as_u64().unwrap(),
        out[0]["seq"].as_u64().unwrap(),
    );

    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let m = out
        .iter()
        .find(|v| v["type"] == "message")
        .expect("the message");
    assert_eq!(m["text"], "the beach");
    assert_eq!(m["media"]["media_id"], media_id.as_str());
    assert_eq!(m["media"]["file_name"], "photo.png");
    assert_eq!(m["media"]["size_bytes"], bytes.len() as u64);
    assert_eq!(m["media"]["content_type"], "image/png");

    let dest = tmp.path().join("got.png");
    let (ok, out) = ben.run(&[
        "download",
        "--conversation",
        &conv.to_string(),
        "--seq",
        &seq.to_string(),
        "--media-id",
        &media_id,
        "--out",
        dest.to_str().unwrap(),
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "downloaded");
    assert_eq!(out[0]["bytes"], bytes.len() as u64);
    assert!(
        std::fs::read(&dest).unwrap() == bytes,
        "downloaded bytes differ"
    );

    // A message that does not carry that media: a clear error, nothing written.
    let other = tmp.path().join("nothing");
    let (ok, out) = ben.run(&[
        "download",
        "--conversation",
        &conv.to_string(),
        "--seq",
        "77",
        "--media-id",
        &media_id,
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(out[0]["type"], "error", "{out:?}");
    assert_eq!(out[0]["code"], "NOT_FOUND", "{out:?}");
    assert!(!other.exists());
    // An avatar: Ana sets it, Ben (who shares a conversation with her) downloads it.
    let (face, face_bytes) = file_of(tmp.path(), "face.png", 5000);
    let (ok, out) = ana.run(&[
        "avatar",
        "--file",
        face.to_str().unwrap(),
        "--content-type",
        "image/png",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "profile");
    let avatar_id = out[0]["avatar"]["media_id"].as_str().unwrap().to_owned();
    let dest = tmp.path().join("face-copy.png");
    let (ok, out) = ben.run(&[
        "download",
        "--user",
        &ana_id.to_string(),
        "--media-id",
        &avatar_id,
        "--out",
        dest.to_str().unwrap(),
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["user_id"], ana_id);
    assert!(std::fs::read(&dest).unwrap() == face_bytes);
    let (ok, out) = ana.run(&["avatar", "--clear"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["avatar"], Value::Null);
    // A type the server does not accept is refused before anything is uploaded.
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        &ben_id.to_string(),
        "--file",
        file.to_str().unwrap(),
        "--content-type",
        "text/html",
    ]);
    assert!(!ok);
    assert_eq!(out[0]["code"], "INVALID_ARGUMENT", "{out:?}");
}

#[tokio::test]
async fn sdk_uploads_sends_and_downloads_and_refuses_non_members() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(&bin, &tmp.path().join("data"), "127.0.0.1:0", MEDIA_TOML);
    let (ana, ben, cy) = (
        Cli {
            server: &server,
            profile: tmp.path().join("ana"),
        },
        Cli {
            server: &server,
            profile: tmp.path().join("ben"),
        },
        Cli {
            server: &server,
            profile: tmp.path().join("cy"),
        },
    );
    register(&ana, "+15550300011", "Ana");
    let ben_id = register(&ben, "+15550300012", "Ben");
    register(&cy, "+15550300013", "Cy");
    let (a, _ea) = synced_client(&server, &ana.profile).await;
    let (b, mut eb) = synced_client(&server, &ben.profile).await;
    let (c, _ec) = synced_client(&server, &cy.profile).await;
    assert!(
        a.server_features()
            .await
            .unwrap()
            .iter()
            .any(|f| f == "media")
    );

    let (file, bytes) = file_of(tmp.path(), "doc.pdf", 700_000);
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let s2 = seen.clone();
    let media = a
        .upload_file(
            &file,
            "application/pdf",
            Box::new(move |done, _| s2.store(done, std::sync::atomic::Ordering::Relaxed)),
        )
        .await
        .unwrap();
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::Relaxed),
        bytes.len() as u64
    );
    assert_eq!(media.file_name, "doc.pdf");
    let ack = a
        .send_with_media(
            Target::User(ben_id),
            "text/plain",
            b"read this".to_vec(),
            Some(&media),
        )
        .await
        .unwrap();
    // Ben's SDK hands over the message with its media.
    let got = loop {
        if let Event::Message(m) = next(&mut eb).await
            && m.seq == ack.seq
        {
            break m;
        }
    };
    assert_eq!(got.media.as_deref(), Some(&media));
    let dest = tmp.path().join("doc-copy.pdf");
    let n = b
        .download_media(
            &media.media_id,
            ack.conversation_id,
            ack.seq,
            &dest,
            Box::new(|_, _| {}),
        )
        .await
        .unwrap();
    assert_eq!(n, bytes.len() as u64);
    assert!(std::fs::read(&dest).unwrap() == bytes);
    // Cy is not in the conversation.
    let e = c
        .download_media(
            &media.media_id,
            ack.conversation_id,
            ack.seq,
            &tmp.path().join("cy.pdf"),
            Box::new(|_, _| {}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(s) if s.code() == ErrorCode::NotAMember),
        "{e:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}
