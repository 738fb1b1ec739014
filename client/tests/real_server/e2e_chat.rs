//! `chat --e2e` through the real binary: each typed line is sealed as `send --e2e` seals it
//! (the server stores only containers), a reply sent end to end while the chat runs is shown
//! decrypted, and the chat's own lines read back as text; a conversation or a device without
//! keys is refused.

use std::io::Write as _;

use super::contacts::register;
use super::e2e::{all_bytes, contains};
use super::*;
use starling_client::e2e::olm::CONTENT_TYPE;

const LINES: [&str; 2] = [
    "typed secret one: the heron waits",
    "typed secret two: the tide turns at four",
];
const REPLY: &str = "reply secret: the lantern is lit";

/// The next JSON line of a running chat that `pick` accepts (others are kept in `seen`).
fn until(
    lines: &std::sync::mpsc::Receiver<Value>,
    seen: &mut Vec<Value>,
    pick: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let v = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}; the chat printed {seen:?}"));
        seen.push(v.clone());
        if pick(&v) {
            return v;
        }
    }
}

#[test]
fn chat_e2e_seals_each_line_and_shows_replies_decrypted() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&bin, &data, "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let ana_id = register(&ana, "+15550920001", "Ana");
    let ben_id = register(&ben, "+15550920002", "Ben");
    // By phone: a contact may fetch the keys before the first message.
    let ben_to = "+15550920002";

    // Refused before anything is read: no keys yet; a conversation rather than a user.
    let (ok, out) = ana.run(&["chat", "--with", ben_to, "--e2e"]);
    assert!(!ok, "{out:?}");
    assert!(
        out[0]["message"].as_str().unwrap().contains("keys upload"),
        "{out:?}"
    );
    for c in [&ana, &ben] {
        let (ok, out) = c.run(&["keys", "upload", "--one-time", "5"]);
        assert!(ok, "{out:?}");
    }
    let (ok, out) = ana.run(&["chat", "--with", "conv:1", "--e2e"]);
    assert!(!ok, "{out:?}");
    assert!(
        out[0]["message"].as_str().unwrap().contains("one user"),
        "{out:?}"
    );

    let mut chat = Command::new(env!("CARGO_BIN_EXE_starling-cli"))
        .args(["--json", "--server"])
        .arg(server.addr.to_string())
        .arg("--profile")
        .arg(&ana.profile)
        .arg("--ca")
        .arg(server.ca())
        .args(["--timeout", "10", "chat", "--with", ben_to, "--e2e"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    let stdout = chat.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let reading = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let is_sent = |v: &Value| v["type"] == "sent";
    writeln!(stdin, "{}", LINES[0]).unwrap();
    stdin.flush().unwrap();
    let sent = until(&lines, &mut seen, is_sent);
    let devices = sent["e2e"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{sent}");
    assert_eq!(devices[0]["user_id"], ben_id);
    assert_eq!(devices[0]["new_session"], true);

    // Ben answers end to end while the chat runs: shown decrypted there.
    let (ok, out) = ben.run(&[
        "send",
        "--to",
        &ana_id.to_string(),
        "--text",
        REPLY,
        "--e2e",
    ]);
    assert!(ok, "{out:?}");
    let reply = until(&lines, &mut seen, |v| {
        v["type"] == "message" && v["sender_user_id"] == ben_id
    });
    assert_eq!(reply["e2e"], true, "{reply}");
    assert_eq!(reply["text"], REPLY, "{reply}");

    writeln!(stdin, "{}", LINES[1]).unwrap();
    stdin.flush().unwrap();
    let sent = until(&lines, &mut seen, is_sent);
    assert_eq!(sent["e2e"]["devices"][0]["new_session"], false, "{sent}");
    // The chat shows its own line once it comes back, before or after the "sent" line; wait
    // for it before ending the chat (at the end of its input the chat stops without waiting
    // for its own copies).
    let seq = sent["seq"].clone();
    let own_copy =
        |v: &Value| v["type"] == "message" && v["sender_user_id"] == ana_id && v["seq"] == seq;
    if !seen.iter().any(own_copy) {
        until(&lines, &mut seen, own_copy);
    }
    drop(stdin);
    let status = chat.wait().unwrap();
    reading.join().unwrap();
    seen.extend(lines.try_iter());
    assert!(status.success(), "{seen:?}");
    // Every message the chat showed is end to end and read as text, its own lines too.
    let shown: Vec<&Value> = seen.iter().filter(|v| v["type"] == "message").collect();
    assert!(
        shown.iter().all(|v| v["e2e"] == true
            && v["content_type"] == CONTENT_TYPE
            && v["text"].is_string()),
        "{seen:?}"
    );
    let own: Vec<&str> = shown
        .iter()
        .filter(|v| v["sender_user_id"] == ana_id)
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    assert_eq!(own, LINES, "{seen:?}");

    // Ben reads the typed lines; the server holds none of the three texts.
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let texts: Vec<&str> = out
        .iter()
        .filter(|v| v["type"] == "message")
        .map(|v| v["text"].as_str().unwrap_or_else(|| panic!("{v}")))
        .collect();
    assert_eq!(texts, [LINES[0], REPLY, LINES[1]], "{out:?}");
    let files = all_bytes(&data);
    assert!(files.iter().any(|(_, b)| contains(b, CONTENT_TYPE)));
    for (p, b) in &files {
        for s in LINES.iter().chain([&REPLY]) {
            assert!(!contains(b, s), "{} holds {s:?}", p.display());
        }
    }
}
