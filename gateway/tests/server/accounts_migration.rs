//! A data dir made before the one account store (accounts in `accounts.redb`, written here in
//! that release's format) is migrated by the real binary at start: every account, device,
//! session and code keeps working, the start prints one line saying so, and the old file is
//! kept under a new name. A file that cannot be migrated is refused with a message saying what
//! to do.

use super::messaging::{call, text};
use super::*;
use starling_gateway::accounts::migrate::old_format::{OldAccounts, write};
use starling_gateway::accounts::migrate::{OldDevice, OldSession, OldUser};

fn sha_hex(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

/// Two users (Ana by phone, Ben by e-mail), one device and one session each, whose refresh
/// tokens are "ana-refresh" and "ben-refresh".
fn old_accounts() -> OldAccounts {
    let user = |name: &str, phone: Option<&str>, email: Option<&str>| OldUser {
        display_name: name.into(),
        about: format!("{name} climbs"),
        phone: phone.map(Into::into),
        email: email.map(Into::into),
        created_at_ms: 1_700_000_000_000,
        password_hash: None,
        next_device_id: 2,
    };
    let session = |user_id: u64, token: &str| OldSession {
        user_id,
        device_id: 1,
        created_at_ms: 1_700_000_000_000,
        revoked: false,
        refresh_sha256: sha_hex(token),
        refresh_expires_at_ms: unix_ms() + 24 * 3600 * 1000,
    };
    let device = OldDevice {
        name: "old phone".into(),
        platform: "android".into(),
        created_at_ms: 1_700_000_000_000,
        last_seen_ms: 1_700_000_000_000,
    };
    OldAccounts {
        users: vec![
            (
                "phone:+15550001".into(),
                1,
                user("Ana", Some("+15550001"), None),
                None,
            ),
            (
                "email:ben@example.org".into(),
                2,
                user("Ben", None, Some("ben@example.org")),
                None,
            ),
        ],
        devices: vec![(1, 1, device.clone()), (2, 1, device)],
        sessions: vec![
            (1, session(1, "ana-refresh"), Vec::new()),
            (2, session(2, "ben-refresh"), Vec::new()),
        ],
        counters: vec![("user".into(), 3), ("session".into(), 3)],
        ..OldAccounts::default()
    }
}

fn refresh(srv: &Server, token: &str) -> v1::SessionGranted {
    let mut c = srv.hello("");
    match c.request(Body::Refresh(v1::Refresh {
        refresh_token: token.into(),
    })) {
        Body::SessionGranted(g) => g,
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_old_accounts_file_is_migrated_at_start_and_every_account_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write(&data.join("accounts.redb"), &old_accounts()).unwrap();
    let srv = Server::start_in(dir, "auto", "");
    let said: Vec<_> = srv
        .startup
        .iter()
        .filter(|l| l.starts_with("accounts: "))
        .collect();
    assert_eq!(said.len(), 1, "{:?}", srv.startup);
    assert!(
        said[0].contains("moved 2 users, 2 devices, 2 sessions") && said[0].contains(".migrated"),
        "{}",
        said[0]
    );
    let data = srv.dir.path().join("data");
    assert!(!data.join("accounts.redb").exists());
    assert!(data.join("accounts.redb.migrated").exists());

    // The old refresh tokens still sign their devices in.
    let ga = refresh(&srv, "ana-refresh");
    let gb = refresh(&srv, "ben-refresh");
    assert_eq!((ga.user_id, ga.device_id, ga.session_id), (1, 1, 1));
    assert_eq!((gb.user_id, gb.device_id, gb.session_id), (2, 1, 2));
    let mut a = srv.hello(&ga.access_token);
    match call(&mut a, Body::GetMe(v1::GetMe {})) {
        Body::Profile(p) => assert_eq!(
            (p.display_name.as_str(), p.about.as_str(), p.phone.as_str()),
            ("Ana", "Ana climbs", "+15550001")
        ),
        other => panic!("{other:?}"),
    }
    match call(&mut a, Body::ListDevices(v1::ListDevices {})) {
        Body::DeviceList(l) => {
            assert_eq!(l.devices.len(), 1);
            assert_eq!(l.devices[0].name, "old phone");
        }
        other => panic!("{other:?}"),
    }
    // Messages between migrated users carry their migrated names.
    let conv = match call(&mut a, text(1, gb.user_id, "hi ben")) {
        Body::SendAck(ack) => ack.conversation_id,
        other => panic!("{other:?}"),
    };
    let mut b = srv.hello(&gb.access_token);
    match call(
        &mut b,
        Body::ListConversations(v1::ListConversations::default()),
    ) {
        Body::ConversationList(l) => {
            let s = l.conversations.iter().find(|s| s.conversation_id == conv);
            assert_eq!(s.map(|s| s.title.as_str()), Some("Ana"), "{l:?}");
        }
        other => panic!("{other:?}"),
    }
    // The counters continue: the next user is 3, a new sign-in of Ana is device 2.
    let mut c = srv.hello("");
    let gc = register(&srv, &mut c, email("cy@example.org"), "cy@example.org");
    assert_eq!(gc.user_id, 3);
    // Once migrated, a restart has nothing to migrate and keeps everything.
    drop((a, b, c));
    let srv = srv.kill9_and_restart("auto");
    assert!(
        !srv.startup.iter().any(|l| l.starts_with("accounts: ")),
        "{:?}",
        srv.startup
    );
    let mut a = srv.hello(&ga.access_token);
    match call(&mut a, Body::GetMe(v1::GetMe {})) {
        Body::Profile(p) => assert_eq!(p.display_name, "Ana"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_accounts_file_that_cannot_be_read_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("accounts.redb"), b"not a redb file").unwrap();
    let out = super::faults::serve_expecting_exit(&data, &["--shards", "1"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("accounts.redb")
            && out
                .stderr
                .contains("Restore the file from a backup, or move it out of the data dir"),
        "{out:?}"
    );
    // Nothing was changed: the file is where it was.
    assert_eq!(
        std::fs::read(data.join("accounts.redb")).unwrap(),
        b"not a redb file"
    );
    assert!(!data.join("accounts.redb.migrated").exists());
}
