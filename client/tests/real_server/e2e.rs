//! End-to-end encrypted 1:1 messages (Olm, `send --e2e`) through the CLI against the real
//! binary: the server stores and delivers only the container, the recipient's devices and the
//! sender's other devices read the plaintext, and a tampered body is reported undecryptable.

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
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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

fn contains(hay: &[u8], needle: &str) -> bool {
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
