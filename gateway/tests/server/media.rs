//! Media through the real binary (issue 36 §2): upload → send → the recipient downloads the
//! same bytes (whole and by Range) through Deliver, Sync and history; expired, tampered,
//! oversized and wrong-type grants refused; a partial or corrupt upload never visible; a
//! non-member gets no download grant; unreferenced uploads collected.

use super::messaging::{ana_and_ben, call, recv_until};
use super::*;

const MEDIA_TOML: &str = "[media]\nlisten = \"127.0.0.1:0\"\nsize_bytes_max = 1000000\n\
     content_types = [\"image/png\", \"application/octet-stream\"]\n";

/// An HTTP answer.
#[derive(Debug)]
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn media_stream(srv: &Server) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = tcp_connect(srv.media_addr.expect("media endpoint"), None, None).unwrap();
    let conn =
        rustls::ClientConnection::new(srv.tls.clone(), "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// The path and query of a grant URL (it must point at this server's endpoint).
fn path_of(srv: &Server, url: &str) -> String {
    let base = format!("https://{}", srv.media_addr.unwrap());
    url.strip_prefix(&base)
        .unwrap_or_else(|| panic!("{url} is not under {base}"))
        .to_owned()
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`).
fn http(srv: &Server, method: &str, pq: &str, headers: &[(&str, &str)], body: &[u8]) -> Http {
    let mut s = media_stream(srv);
    let mut req = format!("{method} {pq} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (and close) before it has read everything: a refusal.
    let _ = s.write_all(&bytes).and_then(|()| s.flush());
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_http(&raw)
}

fn parse_http(raw: &[u8]) -> Http {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Http {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

fn request_upload(c: &mut Client, content_type: &str, bytes: &[u8]) -> Body {
    call(
        c,
        Body::RequestUpload(v1::RequestUpload {
            content_type: content_type.into(),
            size_bytes: bytes.len() as u64,
            sha256: sha256(bytes).into(),
        }),
    )
}

fn upload_grant(c: &mut Client, content_type: &str, bytes: &[u8]) -> v1::UploadGrant {
    match request_upload(c, content_type, bytes) {
        Body::UploadGrant(g) => g,
        other => panic!("{other:?}"),
    }
}

/// PUTs `bytes` with the grant's headers.
fn put(srv: &Server, g: &v1::UploadGrant, bytes: &[u8]) -> Http {
    let headers: Vec<(&str, &str)> = g
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    http(
        srv,
        &g.method,
        &path_of(srv, &g.upload_url),
        &headers,
        bytes,
    )
}

/// Uploads `bytes` and returns the MediaRef to send.
fn upload(srv: &Server, c: &mut Client, bytes: &[u8]) -> v1::MediaRef {
    let g = upload_grant(c, "image/png", bytes);
    assert_eq!(g.media_id, hex::encode(sha256(bytes)));
    assert_eq!(g.headers["content-length"], bytes.len().to_string());
    let r = put(srv, &g, bytes);
    assert_eq!(r.status, 201, "{r:?}");
    v1::MediaRef {
        media_id: g.media_id,
        content_type: "image/png".into(),
        size_bytes: bytes.len() as u64,
        sha256: sha256(bytes).into(),
        width: 2,
        height: 1,
        file_name: "dot.png".into(),
        ..Default::default()
    }
}

fn send_media(c: &mut Client, cmid: u8, to: u64, media: &v1::MediaRef) -> Body {
    call(
        c,
        Body::Send(v1::Send {
            client_msg_id: vec![cmid; 16].into(),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::UserId(to)),
            }),
            content_type: "text/plain".into(),
            body: b"look".to_vec().into(),
            media: Some(Box::new(media.clone())),
            ..Default::default()
        }),
    )
}

fn download_grant(c: &mut Client, media_id: &str, conv: u64, seq: u64) -> Body {
    call(
        c,
        Body::RequestDownload(v1::RequestDownload {
            media_id: media_id.into(),
            conversation_id: conv,
            seq,
            user_id: 0,
        }),
    )
}

fn objects(srv: &Server) -> usize {
    std::fs::read_dir(srv.dir.path().join("data/media/objects"))
        .unwrap()
        .count()
}

fn temporaries(srv: &Server) -> usize {
    std::fs::read_dir(srv.dir.path().join("data/media/tmp"))
        .unwrap()
        .count()
}

#[test]
fn upload_send_and_the_recipient_downloads_the_same_bytes() {
    let srv = Server::start("io-uring", MEDIA_TOML);
    let (mut a, _ga, mut b, gb) = ana_and_ben(&srv);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let media = upload(&srv, &mut a, &bytes);
    let Body::SendAck(ack) = send_media(&mut a, 1, gb.user_id, &media) else {
        panic!()
    };
    // Deliver carries the MediaRef unchanged.
    let (f, _) = recv_until(&mut b, |f| matches!(f.body, Some(Body::Deliver(_))));
    let Some(Body::Deliver(d)) = f.body else {
        panic!()
    };
    let m = d.message.unwrap();
    assert_eq!(m.media.as_deref(), Some(&media));
    assert_eq!(m.seq, ack.seq);
    // So do history and Sync.
    let Body::HistoryPage(p) = call(
        &mut b,
        Body::GetHistory(v1::GetHistory {
            conversation_id: ack.conversation_id,
            ..Default::default()
        }),
    ) else {
        panic!()
    };
    assert_eq!(p.messages[0].media.as_deref(), Some(&media));
    let id = b.next_id;
    b.next_id += 1;
    b.send(
        id,
        Body::Sync(v1::Sync {
            last_seq: [(ack.conversation_id, 0)].into_iter().collect(),
        }),
    );
    let (_, synced) = recv_until(&mut b, |f| {
        f.request_id == id && matches!(f.body, Some(Body::SyncDone(_)))
    });
    assert!(synced.iter().any(|f| matches!(&f.body,
        Some(Body::Deliver(d)) if d.message.as_ref().and_then(|m| m.media.as_deref()) == Some(&media))));
    // The recipient gets a grant and the same bytes.
    let Body::DownloadGrant(g) =
        download_grant(&mut b, &media.media_id, ack.conversation_id, ack.seq)
    else {
        panic!()
    };
    let pq = path_of(&srv, &g.download_url);
    let r = http(&srv, "GET", &pq, &[], b"");
    assert_eq!(r.status, 200, "{:?}", r.header("content-length"));
    assert!(r.body == bytes, "downloaded bytes differ");
    // Ranges: a slice, a suffix, and an unsatisfiable one.
    let r = http(&srv, "GET", &pq, &[("range", "bytes=1000-1999")], b"");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 1000-1999/300000"));
    assert!(r.body == bytes[1000..2000]);
    let r = http(&srv, "GET", &pq, &[("range", "bytes=-10")], b"");
    assert_eq!((r.status, &r.body[..]), (206, &bytes[bytes.len() - 10..]));
    let r = http(&srv, "GET", &pq, &[("range", "bytes=300000-")], b"");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */300000"));
    // The sender may download it too; a message without that media gives no grant.
    assert!(matches!(
        download_grant(&mut a, &media.media_id, ack.conversation_id, ack.seq),
        Body::DownloadGrant(_)
    ));
    let other = "0".repeat(64);
    assert_eq!(
        err_code(&download_grant(
            &mut b,
            &other,
            ack.conversation_id,
            ack.seq
        )),
        ErrorCode::NotFound
    );
    assert_eq!(
        err_code(&download_grant(
            &mut b,
            &media.media_id,
            ack.conversation_id,
            99
        )),
        ErrorCode::NotFound
    );
    assert_eq!(
        err_code(&download_grant(&mut b, "zz", ack.conversation_id, ack.seq)),
        ErrorCode::InvalidArgument
    );
    // A third user, not in the conversation, gets no grant.
    let mut c = srv.hello("");
    register(&srv, &mut c, email("cy@example.org"), "cy@example.org");
    assert_eq!(
        err_code(&download_grant(
            &mut c,
            &media.media_id,
            ack.conversation_id,
            ack.seq
        )),
        ErrorCode::NotAMember
    );
    // A Send naming media never uploaded is refused, and sends nothing.
    let mut ghost = media.clone();
    ghost.media_id = "ab".repeat(32);
    assert_eq!(
        err_code(&send_media(&mut a, 2, gb.user_id, &ghost)),
        ErrorCode::NotFound
    );
    // The same object downloads again after a restart (durable, and the envelope reads back).
    let srv = srv.kill9_and_restart("epoll");
    let mut b = srv.hello(&gb.access_token);
    let Body::DownloadGrant(g) =
        download_grant(&mut b, &media.media_id, ack.conversation_id, ack.seq)
    else {
        panic!()
    };
    let r = http(&srv, "GET", &path_of(&srv, &g.download_url), &[], b"");
    assert!(r.status == 200 && r.body == bytes);
}

#[test]
fn bad_grants_and_bad_uploads_are_refused_and_leave_nothing() {
    let srv = Server::start("epoll", &format!("{MEDIA_TOML}grant_ttl_ms = 1000\n"));
    let (mut a, _ga, _b, gb) = ana_and_ben(&srv);
    let bytes = b"\x89PNG not really".to_vec();
    // At grant time: too large, a type not allowed, a bad hash, size 0.
    let big = vec![0u8; 1_000_001];
    assert_eq!(
        err_code(&request_upload(&mut a, "image/png", &big)),
        ErrorCode::BodyTooLarge
    );
    let Body::Error(e) = request_upload(&mut a, "text/html", &bytes) else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::InvalidArgument as i32);
    assert!(e.message.contains("image/png"), "{}", e.message);
    let mut no_hash = v1::RequestUpload {
        content_type: "image/png".into(),
        size_bytes: 3,
        sha256: vec![1; 31].into(),
    };
    assert_eq!(
        err_code(&call(&mut a, Body::RequestUpload(no_hash.clone()))),
        ErrorCode::InvalidArgument
    );
    no_hash.sha256 = vec![1; 32].into();
    no_hash.size_bytes = 0;
    assert_eq!(
        err_code(&call(&mut a, Body::RequestUpload(no_hash))),
        ErrorCode::InvalidArgument
    );

    let g = upload_grant(&mut a, "image/png", &bytes);
    let pq = path_of(&srv, &g.upload_url);
    let len = bytes.len().to_string();
    // Tampered: another size, another type, another object, another signature.
    for (what, bad) in [
        ("size", pq.replace(&format!("size={len}"), "size=999")),
        (
            "type",
            pq.replace("image%2Fpng", "application%2Foctet-stream"),
        ),
        ("id", pq.replacen(&g.media_id[..4], "ffff", 1)),
        ("sig", {
            let i = pq.find("sig=").unwrap() + 4;
            let flip = if &pq[i..=i] == "0" { "1" } else { "0" };
            format!("{}{flip}{}", &pq[..i], &pq[i + 1..])
        }),
    ] {
        let r = http(
            &srv,
            "PUT",
            &bad,
            &[("content-type", "image/png"), ("content-length", &len)],
            &bytes,
        );
        assert_eq!(r.status, 403, "{what}: {r:?}");
    }
    // An upload URL does not download.
    assert_eq!(http(&srv, "GET", &pq, &[], b"").status, 403);
    // Wrong Content-Type, no length, too many bytes, bytes that are not the hash.
    let r = http(
        &srv,
        "PUT",
        &pq,
        &[("content-type", "image/gif"), ("content-length", &len)],
        &bytes,
    );
    assert_eq!(r.status, 415);
    let r = http(&srv, "PUT", &pq, &[("content-type", "image/png")], b"");
    assert_eq!(r.status, 411);
    let more = format!("{}", bytes.len() + 1);
    let mut longer = bytes.clone();
    longer.push(0);
    let r = http(
        &srv,
        "PUT",
        &pq,
        &[("content-type", "image/png"), ("content-length", &more)],
        &longer,
    );
    assert_eq!(r.status, 413);
    let mut other = bytes.clone();
    other[0] ^= 1;
    let r = http(
        &srv,
        "PUT",
        &pq,
        &[("content-type", "image/png"), ("content-length", &len)],
        &other,
    );
    assert_eq!(r.status, 400, "{r:?}");
    // A partial upload: half the bytes, then the connection drops.
    {
        let mut s = media_stream(&srv);
        let head = format!(
            "PUT {pq} HTTP/1.1\r\nhost: localhost\r\ncontent-type: image/png\r\n\
             content-length: {len}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&bytes[..bytes.len() / 2]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        s.sock.shutdown(Shutdown::Both).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(objects(&srv), 0, "a failed upload became visible");
    assert_eq!(
        temporaries(&srv),
        0,
        "a failed upload left its temporary file"
    );
    let media = v1::MediaRef {
        media_id: g.media_id.clone(),
        ..Default::default()
    };
    assert_eq!(
        err_code(&send_media(&mut a, 1, gb.user_id, &media)),
        ErrorCode::NotFound
    );
    // The grant still works until it expires; then it is refused.
    assert_eq!(put(&srv, &g, &bytes).status, 201);
    assert_eq!(objects(&srv), 1);
    std::thread::sleep(Duration::from_millis(1200));
    let r = put(&srv, &g, &bytes);
    assert_eq!(r.status, 403);
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));
}

#[test]
fn unreferenced_uploads_are_collected_and_referenced_ones_kept() {
    let srv = Server::start(
        "io-uring",
        &format!("{MEDIA_TOML}unreferenced_gc_ms = 1000\n"),
    );
    let (mut a, _ga, mut b, gb) = ana_and_ben(&srv);
    let kept = upload(&srv, &mut a, b"kept bytes");
    let dropped = upload(&srv, &mut a, b"dropped bytes");
    let avatar = upload(&srv, &mut a, b"avatar bytes");
    let Body::SendAck(ack) = send_media(&mut a, 1, gb.user_id, &kept) else {
        panic!()
    };
    assert!(matches!(
        set_avatar(&mut a, Some(&avatar)),
        Body::Profile(_)
    ));
    assert_eq!(objects(&srv), 3);
    let deadline = now() + Duration::from_secs(10);
    while objects(&srv) > 2 {
        assert!(
            now() < deadline,
            "the unreferenced upload was not collected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !srv.dir
            .path()
            .join("data/media/objects")
            .join(&dropped.media_id)
            .exists()
    );
    // Naming it now is refused; the referenced one still downloads.
    assert_eq!(
        err_code(&send_media(&mut a, 2, gb.user_id, &dropped)),
        ErrorCode::NotFound
    );
    let Body::DownloadGrant(g) =
        download_grant(&mut b, &kept.media_id, ack.conversation_id, ack.seq)
    else {
        panic!()
    };
    let r = http(&srv, "GET", &path_of(&srv, &g.download_url), &[], b"");
    assert_eq!((r.status, &r.body[..]), (200, &b"kept bytes"[..]));
    assert!(
        srv.metrics().contains("starling_media_collected_total 1"),
        "{}",
        srv.metrics()
    );
    // The avatar is referenced too: still there after more collections.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        srv.dir
            .path()
            .join("data/media/objects")
            .join(&avatar.media_id)
            .exists()
    );
}

fn set_avatar(c: &mut Client, avatar: Option<&v1::MediaRef>) -> Body {
    call(
        c,
        Body::UpdateProfile(v1::UpdateProfile {
            avatar: avatar.map(|a| Box::new(a.clone())),
            clear_avatar: avatar.is_none(),
            ..Default::default()
        }),
    )
}

fn avatar_grant(c: &mut Client, media_id: &str, user: u64) -> Body {
    call(
        c,
        Body::RequestDownload(v1::RequestDownload {
            media_id: media_id.into(),
            user_id: user,
            ..Default::default()
        }),
    )
}

#[test]
fn avatars_use_the_media_store_and_only_who_may_see_the_profile_downloads_them() {
    let srv = Server::start("epoll", MEDIA_TOML);
    let (mut a, ga, mut b, gb) = ana_and_ben(&srv);
    let image = b"\x89PNG avatar".to_vec();
    let avatar = upload(&srv, &mut a, &image);
    // Not uploaded, or both set and cleared: refused, nothing changed.
    let mut ghost = avatar.clone();
    ghost.media_id = "cd".repeat(32);
    assert_eq!(
        err_code(&set_avatar(&mut a, Some(&ghost))),
        ErrorCode::NotFound
    );
    let both = call(
        &mut a,
        Body::UpdateProfile(v1::UpdateProfile {
            avatar: Some(Box::new(avatar.clone())),
            clear_avatar: true,
            ..Default::default()
        }),
    );
    assert_eq!(err_code(&both), ErrorCode::InvalidArgument);
    let Body::Profile(p) = set_avatar(&mut a, Some(&avatar)) else {
        panic!()
    };
    assert_eq!(p.avatar.as_deref(), Some(&avatar));
    let Body::Profile(me) = call(&mut a, Body::GetMe(v1::GetMe {})) else {
        panic!()
    };
    assert_eq!(me.avatar.as_deref(), Some(&avatar));
    // Ben shares nothing with Ana yet: no profile, no grant.
    assert_eq!(
        err_code(&avatar_grant(&mut b, &avatar.media_id, ga.user_id)),
        ErrorCode::NotFound
    );
    // Once they share a conversation, Ben sees the avatar and downloads it.
    assert!(matches!(
        call(&mut a, super::messaging::text(1, gb.user_id, "hi")),
        Body::SendAck(_)
    ));
    let Body::Profiles(ps) = call(
        &mut b,
        Body::GetProfiles(v1::GetProfiles {
            user_ids: vec![ga.user_id],
        }),
    ) else {
        panic!()
    };
    assert_eq!(ps.profiles[0].avatar.as_deref(), Some(&avatar));
    let Body::DownloadGrant(g) = avatar_grant(&mut b, &avatar.media_id, ga.user_id) else {
        panic!()
    };
    let r = http(&srv, "GET", &path_of(&srv, &g.download_url), &[], b"");
    assert_eq!((r.status, &r.body[..]), (200, &image[..]));
    // Another id, or a message and a user at once: refused.
    assert_eq!(
        err_code(&avatar_grant(&mut b, &"ef".repeat(32), ga.user_id)),
        ErrorCode::NotFound
    );
    let mixed = call(
        &mut b,
        Body::RequestDownload(v1::RequestDownload {
            media_id: avatar.media_id.clone(),
            conversation_id: 5,
            seq: 1,
            user_id: ga.user_id,
        }),
    );
    assert_eq!(err_code(&mixed), ErrorCode::InvalidArgument);
    // Cleared: gone from the profile, no more grants.
    let Body::Profile(p) = set_avatar(&mut a, None) else {
        panic!()
    };
    assert_eq!(p.avatar, None);
    assert_eq!(
        err_code(&avatar_grant(&mut b, &avatar.media_id, ga.user_id)),
        ErrorCode::NotFound
    );
}

#[test]
fn without_a_media_endpoint_media_is_not_supported() {
    let srv = Server::start("epoll", "");
    let (mut a, _ga, _b, gb) = ana_and_ben(&srv);
    let media = v1::MediaRef {
        media_id: "ab".repeat(32),
        ..Default::default()
    };
    assert_eq!(
        err_code(&send_media(&mut a, 1, gb.user_id, &media)),
        ErrorCode::NotSupported
    );
    assert_eq!(
        err_code(&download_grant(&mut a, &media.media_id, 5, 1)),
        ErrorCode::NotSupported
    );
    assert_eq!(
        err_code(&request_upload(&mut a, "image/png", b"x")),
        ErrorCode::NotSupported
    );
}
