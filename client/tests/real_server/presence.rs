//! Presence, typing and profiles through the CLI and the SDK against the
//! real binary.

use std::io::Write as _;

use super::contacts::register;
use super::*;

async fn presence_of(events: &mut starling_client::Events, user: u64) -> v1::PresenceUpdate {
    loop {
        if let Event::Presence(p) = next(events).await
            && p.user_id == user
        {
            return p;
        }
    }
}

/// Ana and Ben share a conversation. Ana follows Ben: online; away when Ben
/// sets it; offline with a last-seen time once his client stops; with
/// `hide_last_seen` (set through the CLI, kept by the server) no last-seen
/// time. The CLI's `presence show` and `profiles` agree. After a server
/// restart, Ana's client follows Ben again by itself.
#[tokio::test]
async fn presence_through_the_sdk_and_the_cli() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = Server::start(&bin, &data, "127.0.0.1:0");
    let cli = |server, name: &str| Cli {
        server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli(&server, "ana"), cli(&server, "ben"));
    let ana_id = register(&ana, "+15550400001", "Ana");
    let ben_id = register(&ben, "+15550400002", "Ben");
    let (ok, out) = ana.run(&["send", "--to", "+15550400002", "--text", "hi"]);
    assert!(ok, "{out:?}");

    let mut connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    connect.request_timeout = Duration::from_secs(5);
    let mut a_cfg = ClientConfig::new(connect.clone(), &ana.profile);
    a_cfg.backoff.base = Duration::from_millis(50);
    a_cfg.backoff.cap = Duration::from_millis(300);
    let (a, mut a_events) = Client::start(a_cfg).unwrap();
    let (b, mut b_events) =
        Client::start(ClientConfig::new(connect.clone(), &ben.profile)).unwrap();
    assert!(matches!(next(&mut b_events).await, Event::Connected { .. }));

    let snap = a.subscribe_presence(&[ben_id]).await.unwrap();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].state(), v1::PresenceState::Online);
    assert_eq!(snap[0].last_seen_ms, 0);
    let (ok, out) = ana.run(&["presence", "show", "--users", "+15550400002"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["state"], "online", "{out:?}");
    let (ok, out) = ana.run(&["profiles", "--users", &ben_id.to_string()]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["display_name"], "Ben");
    assert!(out[0].get("phone").is_none());

    b.set_presence(v1::PresenceState::Away, false)
        .await
        .unwrap();
    assert_eq!(
        presence_of(&mut a_events, ben_id).await.state(),
        v1::PresenceState::Away
    );
    b.shutdown().await;
    drop(b_events);
    let gone = presence_of(&mut a_events, ben_id).await;
    assert_eq!(gone.state(), v1::PresenceState::Offline);
    assert!(gone.last_seen_ms > 0, "{gone:?}");

    // Ben hides his last-seen time (the CLI's connection ends with the command).
    let (ok, out) = ben.run(&["presence", "set", "--hide-last-seen"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "presence_set");
    let (ok, out) = ana.run(&["presence", "show", "--users", &ben_id.to_string()]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["state"], "offline", "{out:?}");
    assert_eq!(out[0]["last_seen_ms"], 0, "{out:?}");

    // A restart: Ana's client reconnects and follows Ben again by itself;
    // Ben coming online reaches it.
    let ben_profile = ben.profile.clone();
    drop((ana, ben));
    let addr = server.addr;
    server.kill();
    let server = Server::start(&bin, &data, &addr.to_string());
    loop {
        if let Event::Connected { .. } = next(&mut a_events).await {
            break;
        }
    }
    let (b, mut b_events) = Client::start(ClientConfig::new(connect, &ben_profile)).unwrap();
    assert!(matches!(next(&mut b_events).await, Event::Connected { .. }));
    loop {
        let p = presence_of(&mut a_events, ben_id).await;
        if p.state() == v1::PresenceState::Online {
            break;
        }
    }
    // Who may not be followed: a stranger.
    let stranger = Cli {
        server: &server,
        profile: tmp.path().join("cy"),
    };
    let cy_id = register(&stranger, "+15550400003", "Cy");
    let err = a.subscribe_presence(&[cy_id]).await.unwrap_err();
    assert_eq!(
        err.server().unwrap().code(),
        v1::ErrorCode::PermissionDenied
    );
    assert_ne!(ana_id, cy_id);
    a.shutdown().await;
    b.shutdown().await;
}

/// `chat` tells the others while a line is being typed (TYPING before the
/// line ends, STOPPED after it is sent) and shows who is typing; typing is
/// never in sync or history.
#[tokio::test]
async fn chat_sends_and_shows_typing() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let ana_id = register(&ana, "+15550400011", "Ana");
    register(&ben, "+15550400012", "Ben");
    let (ok, out) = ana.run(&["send", "--to", "+15550400012", "--text", "first"]);
    assert!(ok, "{out:?}");
    let conv = out[0]["conversation_id"].as_u64().unwrap();

    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let (b, mut b_events) = Client::start(ClientConfig::new(connect, &ben.profile)).unwrap();
    loop {
        if let Event::Synced { .. } = next(&mut b_events).await {
            break;
        }
    }

    let mut chat = Command::new(env!("CARGO_BIN_EXE_starling-cli"))
        .args(["--json", "--server"])
        .arg(server.addr.to_string())
        .arg("--profile")
        .arg(&ana.profile)
        .arg("--ca")
        .arg(server.ca())
        .args(["chat", "--with", &format!("conv:{conv}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    stdin.write_all(b"hel").unwrap();
    stdin.flush().unwrap();
    let typing = loop {
        if let Event::Typing(t) = next(&mut b_events).await {
            break t;
        }
    };
    assert_eq!(typing.conversation_id, conv);
    assert_eq!(typing.user_id, ana_id);
    assert_eq!(typing.state(), v1::TypingState::Typing);

    // Ben types back: Ana's chat shows it.
    b.typing(conv, v1::TypingState::Typing).await.unwrap();
    stdin.write_all(b"lo\n").unwrap();
    stdin.flush().unwrap();
    let (mut got_message, mut got_stop) = (false, false);
    while !(got_message && got_stop) {
        match next(&mut b_events).await {
            Event::Message(m) if m.conversation_id == conv => {
                assert_eq!(&m.body[..], b"hello");
                got_message = true;
            }
            Event::Typing(t) if t.state() == v1::TypingState::Stopped => got_stop = true,
            _ => {}
        }
    }
    drop(stdin);
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "typing" && v["typing"] == true && v["conversation_id"] == conv),
        "{lines:?}"
    );
    assert!(lines.iter().any(|v| v["type"] == "sent"), "{lines:?}");

    // Never stored: history has the two messages and nothing else.
    let page = b
        .history(conv, starling_client::HistoryAnchor::Latest, 50)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 2);
    b.shutdown().await;
}
