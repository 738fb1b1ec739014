//! The CLI resolves a `+phone` once and remembers it in the profile.

use super::*;

/// Registers a user through the CLI; returns its id.
pub(crate) fn register(cli: &Cli<'_>, phone: &str, name: &str) -> u64 {
    let (ok, out) = cli.run(&["request-otp", "--phone", phone]);
    assert!(ok, "{out:?}");
    let code = cli.server.otp(phone);
    let (ok, out) = cli.run(&["verify", "--phone", phone, "--code", &code, "--name", name]);
    assert!(ok, "{out:?}");
    out[0]["user_id"].as_u64().unwrap()
}

/// 25 sends to the same `+phone`: every one is acknowledged (each used to
/// run a contact discovery, and the 21st within an hour failed RATE_LIMITED
/// for an hour); the number is remembered in the profile's contacts.json.
#[test]
fn cli_sends_to_the_same_phone_25_times() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let ana = Cli {
        server: &server,
        profile: tmp.path().join("ana"),
    };
    let ben = Cli {
        server: &server,
        profile: tmp.path().join("ben"),
    };
    let ana_id = register(&ana, "+15550200001", "Ana");
    let ben_phone = "+15550200002";
    let ben_id = register(&ben, ben_phone, "Ben");
    for i in 1..=25u64 {
        let text = format!("hi #{i}");
        let (ok, out) = ana.run(&["send", "--to", ben_phone, "--text", &text]);
        assert!(ok, "send {i}: {out:?}");
        assert_eq!(out[0]["type"], "sent");
        assert_eq!(out[0]["seq"], i);
    }
    let contacts: Value =
        serde_json::from_slice(&std::fs::read(ana.profile.join("contacts.json")).unwrap()).unwrap();
    assert_eq!(contacts["user_id"], ana_id);
    assert_eq!(contacts["phones"][ben_phone], ben_id);
    // And it is Ben who got them.
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let got: Vec<&Value> = out.iter().filter(|v| v["type"] == "message").collect();
    assert_eq!(got.len(), 25, "{out:?}");
    assert!(got.iter().all(|m| m["sender_user_id"] == ana_id));
}
