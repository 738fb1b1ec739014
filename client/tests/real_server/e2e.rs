//! End-to-end encrypted 1:1 messages (Olm, `send --e2e`) through the CLI against the real
//! binary: the server stores and delivers only the container, the recipient's devices and the
//! sender's other devices read the plaintext, and a tampered body is reported undecryptable;
//! a one-time prekey is taken per new session, not per message, and the sender follows the
//! recipient's devices as they are added and removed.

use super::contacts::register;
use super::*;
use starling_client::e2e::DeviceKeys;
use starling_client::e2e::olm::CONTENT_TYPE;

const SECRETS: [&str; 4] = [
    "first secret: the owl flies at midnight",
    "second secret: under the old oak",
    "third secret: never delivered intact",
    "fourth secret: the sessions outlive the process",
];

/// Every file under `dir`, raw bytes.
pub(crate) fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

pub(crate) fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Ana sends Ben two `--e2e` messages (a pre-key message, then a normal one on the same
/// session); Ben reads both with `sync` and again with `history`, as does Ana's second
/// device; no file of the server's data directory holds a plaintext, while the container's
/// content type is there. A body tampered with is shown as undecryptable, and the next
/// message opens again (sessions persist across runs); `send --e2e` without keys, to a user
/// without keys or to a conversation is refused.
#[tokio::test]
async fn e2e_messages_through_the_cli_and_a_blind_server() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&bin, &data, "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ana2, ben) = (cli("ana"), cli("ana2"), cli("ben"));
    let ana_id = register(&ana, "+15550900001", "Ana");
    let ben_id = register(&ben, "+15550900002", "Ben");
    assert_eq!(register(&ana2, "+15550900001", "Ana"), ana_id);

    let (ok, out) = ana.run(&["send", "--to", "+15550900002", "--text", "x", "--e2e"]);
    assert!(!ok, "no keys yet: {out:?}");
    assert_eq!(out[0]["type"], "error", "{out:?}");
    assert!(
        out[0]["message"].as_str().unwrap().contains("keys upload"),
        "{out:?}"
    );
    let (ok, out) = ana.run(&["keys", "upload", "--one-time", "5"]);
    assert!(ok, "{out:?}");
    let (ok, out) = ana.run(&["send", "--to", "+15550900002", "--text", "x", "--e2e"]);
    assert!(!ok, "ben has no keys yet: {out:?}");
    assert!(
        out[0]["message"]
            .as_str()
            .unwrap()
            .contains("no device to encrypt for"),
        "{out:?}"
    );
    let (ok, out) = ana.run(&["send", "--to", "conv:1", "--text", "x", "--e2e"]);
    assert!(!ok, "{out:?}");
    assert!(
        out[0]["message"].as_str().unwrap().contains("one user"),
        "{out:?}"
    );
    for c in [&ana2, &ben] {
        let (ok, out) = c.run(&["keys", "upload", "--one-time", "5"]);
        assert!(ok, "{out:?}");
        assert_eq!(out[0]["one_time_prekeys"], 5);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(ben.profile.join("olm.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The first: a new session (pre-key message) to Ben's device and Ana's other device.
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        "+15550900002",
        "--text",
        SECRETS[0],
        "--e2e",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "sent");
    let devices = out[0]["e2e"]["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 2, "{out:?}");
    assert!(devices.iter().all(|d| d["new_session"] == true), "{out:?}");
    assert!(devices.iter().any(|d| d["user_id"] == ben_id));
    assert!(devices.iter().any(|d| d["user_id"] == ana_id));
    let conv = out[0]["conversation_id"].as_u64().unwrap();
    // The second: the stored sessions (a normal Olm message).
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        &ben_id.to_string(),
        "--text",
        SECRETS[1],
        "--e2e",
    ]);
    assert!(ok, "{out:?}");
    let devices = out[0]["e2e"]["devices"].as_array().unwrap();
    assert!(devices.iter().all(|d| d["new_session"] == false), "{out:?}");

    let texts = |out: &[Value]| -> Vec<String> {
        out.iter()
            .filter(|v| v["type"] == "message")
            .map(|v| {
                assert_eq!(v["content_type"], CONTENT_TYPE, "{v}");
                assert_eq!(v["e2e"], true, "{v}");
                v["text"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_owned()
            })
            .collect()
    };
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    assert_eq!(texts(&out), SECRETS[..2], "{out:?}");
    // An Olm message opens once: history reads the plaintexts kept in the profile.
    let (ok, out) = ben.run(&["history", "--with", &ana_id.to_string()]);
    assert!(ok, "{out:?}");
    assert_eq!(texts(&out), SECRETS[..2], "{out:?}");
    let (ok, out) = ana2.run(&["history", "--with", &format!("conv:{conv}")]);
    assert!(ok, "{out:?}");
    assert_eq!(texts(&out), SECRETS[..2], "{out:?}");
    let (ok, out) = ana.run(&["history", "--with", &format!("conv:{conv}")]);
    assert!(ok, "{out:?}");
    assert_eq!(texts(&out), SECRETS[..2], "the sender's own copy: {out:?}");

    // Tampered: Ana's keys seal the third, one character of Ben's Olm message is changed.
    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let (a, mut a_events) = Client::start(ClientConfig::new(connect, &ana.profile)).unwrap();
    while !matches!(next(&mut a_events).await, Event::Connected { .. }) {}
    let mut keys = DeviceKeys::load_or_generate(&ana.profile).unwrap();
    let bundles = a.fetch_key_bundles(ben_id, &[]).await.unwrap();
    let sealed = keys
        .seal((ana_id, a.device_id()), &bundles, SECRETS[2])
        .unwrap();
    keys.save(&ana.profile).unwrap();
    let mut c: Value = serde_json::from_slice(&sealed.body).unwrap();
    let body = c["recipients"][0]["body"].as_str().unwrap().to_owned();
    let mut b = body.into_bytes();
    let at = b.len() / 2;
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    c["recipients"][0]["body"] = Value::String(String::from_utf8(b).unwrap());
    a.send(
        starling_client::Target::User(ben_id),
        CONTENT_TYPE,
        serde_json::to_vec(&c).unwrap(),
    )
    .await
    .unwrap();
    a.shutdown().await;
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let m: Vec<&Value> = out.iter().filter(|v| v["type"] == "message").collect();
    assert_eq!(m.len(), 1, "{out:?}");
    assert_eq!(m[0]["e2e"], true);
    assert!(m[0]["undecryptable"].is_string(), "{out:?}");
    assert!(m[0].get("text").is_none(), "{out:?}");
    // The sessions persisted across runs on both sides: the next one opens in a new run.
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        &ben_id.to_string(),
        "--text",
        SECRETS[3],
        "--e2e",
    ]);
    assert!(ok, "{out:?}");
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    assert_eq!(texts(&out), SECRETS[3..], "{out:?}");

    // The server is blind: no plaintext anywhere in its data directory, the containers are.
    let files = all_bytes(&data);
    assert!(files.iter().any(|(_, b)| contains(b, CONTENT_TYPE)));
    for (p, b) in &files {
        for s in SECRETS {
            assert!(!contains(b, s), "{} holds {s:?}", p.display());
        }
    }
}

/// Ana sends Ben two `--e2e` messages: Ben's device gives up one one-time prekey, not two,
/// and Ana's none (listing her own devices takes nothing). Ben signs in a second device: the
/// third message reaches it on a new session (its one prekey taken), the first device on its
/// old one. Ben removes the second device: the fourth reaches only the first, and Ana's
/// profile no longer holds a session with the removed one. The server holds no plaintext.
#[tokio::test]
async fn e2e_sends_take_a_one_time_prekey_per_new_session_only() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&bin, &data, "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben, ben2) = (cli("ana"), cli("ben"), cli("ben2"));
    let ana_id = register(&ana, "+15550910001", "Ana");
    let ben_id = register(&ben, "+15550910002", "Ben");
    for c in [&ana, &ben] {
        let (ok, out) = c.run(&["keys", "upload", "--one-time", "5"]);
        assert!(ok, "{out:?}");
    }
    let count = |c: &Cli<'_>| -> u64 {
        let (ok, out) = c.run(&["keys", "count"]);
        assert!(ok, "{out:?}");
        out[0]["one_time_prekeys"].as_u64().unwrap()
    };
    let send = |text: &str| -> Vec<(u64, u64, bool)> {
        // By phone: a contact may fetch the keys before the first message (the rule of
        // presence and profiles).
        let (ok, out) = ana.run(&["send", "--to", "+15550910002", "--text", text, "--e2e"]);
        assert!(ok, "{out:?}");
        assert_eq!(out[0]["type"], "sent", "{out:?}");
        assert_eq!(
            out[0]["e2e"]["skipped"].as_array().unwrap().len(),
            0,
            "{out:?}"
        );
        let mut d: Vec<(u64, u64, bool)> = out[0]["e2e"]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["user_id"].as_u64().unwrap(),
                    d["device_id"].as_u64().unwrap(),
                    d["new_session"].as_bool().unwrap(),
                )
            })
            .collect();
        d.sort_unstable();
        d
    };

    let first = send(SECRETS[0]);
    assert_eq!(first.len(), 1, "{first:?}");
    let ben_dev = first[0].1;
    assert_eq!(first, [(ben_id, ben_dev, true)]);
    assert_eq!(send(SECRETS[1]), [(ben_id, ben_dev, false)]);
    assert_eq!(count(&ben), 4, "two sends, one new session, one prekey");
    assert_eq!(count(&ana), 5, "the sender's own device gives none");

    // A new device of Ben's: found by the listing, one prekey taken from it alone.
    assert_eq!(register(&ben2, "+15550910002", "Ben"), ben_id);
    let (ok, out) = ben2.run(&["keys", "upload", "--one-time", "5"]);
    assert!(ok, "{out:?}");
    let third = send(SECRETS[2]);
    assert_eq!(third.len(), 2, "{third:?}");
    assert!(third.contains(&(ben_id, ben_dev, false)), "{third:?}");
    let ben2_dev = third.iter().find(|d| d.1 != ben_dev).unwrap().1;
    assert!(third.contains(&(ben_id, ben2_dev, true)), "{third:?}");
    assert_eq!(count(&ben), 4);
    assert_eq!(count(&ben2), 4);
    let (ok, out) = ben2.run(&["sync"]);
    assert!(ok, "{out:?}");
    let m: Vec<&Value> = out.iter().filter(|v| v["type"] == "message").collect();
    assert_eq!(m.len(), 3, "{out:?}");
    assert_eq!(m[2]["text"], SECRETS[2], "{out:?}");
    assert!(
        m[..2].iter().all(|v| v["undecryptable"]
            .as_str()
            .is_some_and(|w| w.contains("not encrypted for this device"))),
        "sent before the device existed: {out:?}"
    );

    let ben_reads = || -> Vec<String> {
        let (ok, out) = ben.run(&["sync"]);
        assert!(ok, "{out:?}");
        out.iter()
            .filter(|v| v["type"] == "message" && v["sender_user_id"] == ana_id)
            .map(|v| {
                v["text"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(ben_reads(), SECRETS[..3]);

    // The second device is removed: the next message is for the first only, and the
    // sender forgets its session with the removed one.
    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let (b, mut b_events) = Client::start(ClientConfig::new(connect, &ben.profile)).unwrap();
    while !matches!(next(&mut b_events).await, Event::Connected { .. }) {}
    let done = b
        .request(v1::frame::Body::RemoveDevice(v1::RemoveDevice {
            device_id: u32::try_from(ben2_dev).unwrap(),
        }))
        .await
        .unwrap();
    assert!(matches!(done, v1::frame::Body::Done(_)), "{done:?}");
    b.shutdown().await;
    let sessions = |p: &Path| DeviceKeys::load_or_generate(p).unwrap().session_devices();
    let ben2_dev = u32::try_from(ben2_dev).unwrap();
    let ben_dev = u32::try_from(ben_dev).unwrap();
    assert!(sessions(&ana.profile).contains(&(ben_id, ben2_dev)));
    assert_eq!(send(SECRETS[3]), [(ben_id, u64::from(ben_dev), false)]);
    assert_eq!(sessions(&ana.profile), [(ben_id, ben_dev)]);
    assert_eq!(count(&ben), 4);

    assert_eq!(ben_reads(), SECRETS[3..]);
    for (p, b) in &all_bytes(&data) {
        for s in SECRETS {
            assert!(!contains(b, s), "{} holds {s:?}", p.display());
        }
    }
}
