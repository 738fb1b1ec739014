//! Profiles and devices through the CLI against the real binary: `set-profile`'s new name is
//! what the peer's conversation list and `profiles` show at once; `devices` lists the caller's
//! devices with their last-seen times; bad input gets the server's error.

use super::contacts::register;
use super::*;

#[test]
fn a_new_name_set_with_the_cli_titles_the_peers_conversation_and_devices_are_listed() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    register(&ana, "+15550500001", "Ana");
    let ben_id = register(&ben, "+15550500002", "Ben");
    let (ok, out) = ana.run(&["send", "--to", "+15550500002", "--text", "hi"]);
    assert!(ok, "{out:?}");
    let conv = out[0]["conversation_id"].as_u64().unwrap();
    let title = || {
        let (ok, out) = ana.run(&["chats"]);
        assert!(ok, "{out:?}");
        let c = out
            .iter()
            .find(|c| c["conversation_id"].as_u64() == Some(conv))
            .unwrap_or_else(|| panic!("{conv} not in {out:?}"));
        c["title"].as_str().unwrap().to_owned()
    };
    assert_eq!(title(), "Ben");

    let (ok, out) = ben.run(&[
        "set-profile",
        "--name",
        "Benjamin",
        "--about",
        "on the wall",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(
        (&out[0]["display_name"], &out[0]["about"]),
        (&Value::from("Benjamin"), &Value::from("on the wall"))
    );
    assert_eq!(title(), "Benjamin");
    let (ok, out) = ana.run(&["profiles", "--users", &ben_id.to_string()]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["display_name"], "Benjamin");
    assert_eq!(out[0]["about"], "on the wall");

    // Bad text is the server's INVALID_ARGUMENT, and changes nothing.
    let (ok, out) = ben.run(&["set-profile", "--name", "Ben\nroot"]);
    assert!(!ok, "{out:?}");
    assert_eq!(out[0]["type"], "error", "{out:?}");
    assert_eq!(out[0]["code"], "INVALID_ARGUMENT", "{out:?}");
    assert_eq!(title(), "Benjamin");
    // Nothing to change: refused by the CLI before it connects.
    let (ok, out) = ben.run(&["set-profile"]);
    assert!(!ok && out.is_empty(), "{out:?}");

    // One device, this one, seen when it signed in or connected since.
    let (ok, out) = ben.run(&["devices"]);
    assert!(ok, "{out:?}");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["type"], "device");
    assert_eq!(out[0]["current"], true);
    let seen = out[0]["last_seen_ms"].as_u64().unwrap();
    assert!(seen >= out[0]["created_at_ms"].as_u64().unwrap(), "{out:?}");
}
