//! The disappearing-messages timer through the SDK and the CLI against the real binary:
//! `set_disappearing_timer` (a bad value refused before it is queued), `starling-cli timer`,
//! the expiry in the SendAck and in `history`, and the message gone from `history` once it
//! passed.

use super::contacts::register;
use super::*;

#[tokio::test]
async fn sdk_and_cli_set_a_timer_and_messages_disappear() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let _ana_id = register(&ana, "+15550400041", "Ana");
    let ben_id = register(&ben, "+15550400042", "Ben");

    let (a, _a_events) = synced_client(&server, &ana.profile).await;
    let first = a
        .send_text(starling_client::Target::User(ben_id), "kept")
        .await
        .unwrap();
    let conv = first.conversation_id;
    // Out of bounds: refused by the SDK, nothing queued.
    let bad = a.set_disappearing_timer(conv, 3).await.unwrap_err();
    assert!(
        matches!(&bad, starling_client::ClientError::InvalidArgument(m) if m.contains("0 (off) or from 5")),
        "{bad:?}"
    );
    let off = a.set_disappearing_timer(conv, 0).await.unwrap();
    assert_eq!((off.seq, off.expires_at_ms), (first.seq + 1, 0));
    a.shutdown().await;

    // The CLI: ben turns on five seconds; ana's next message carries its expiry.
    let conv_arg = format!("conv:{conv}");
    let (ok, out) = ben.run(&["timer", &conv_arg, "5"]);
    assert!(ok && out[0]["type"] == "sent", "{out:?}");
    let timer_seq = out[0]["seq"].as_u64().unwrap();
    let (ok, out) = ana.run(&["send", "--to", &conv_arg, "--text", "soon gone"]);
    assert!(ok, "{out:?}");
    let gone_seq = out[0]["seq"].as_u64().unwrap();
    let expires = out[0]["expires_at_ms"]
        .as_u64()
        .expect("an expiry in the ack");
    assert_eq!(expires, out[0]["server_ts_ms"].as_u64().unwrap() + 5_000);
    let (ok, out) = ben.run(&["history", "--with", &conv_arg]);
    assert!(ok, "{out:?}");
    let at = |out: &[serde_json::Value], seq: u64| out.iter().find(|l| l["seq"] == seq).cloned();
    let t = at(&out, timer_seq).expect("the timer entry");
    assert_eq!(
        (t["type"].as_str(), t["timer_secs"].as_u64()),
        (Some("timer"), Some(5))
    );
    assert_eq!(at(&out, gone_seq).unwrap()["expires_at_ms"], expires);
    // A bad value from the CLI: the SDK's error, not sent.
    let (ok, out) = ben.run(&["timer", &conv_arg, "1"]);
    assert!(!ok, "{out:?}");
    while now_ms() < expires + 100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (ok, out) = ben.run(&["history", "--with", &conv_arg]);
    assert!(ok, "{out:?}");
    assert!(
        at(&out, gone_seq).is_none(),
        "expired, still served: {out:?}"
    );
    assert!(at(&out, first.seq).is_some() && at(&out, timer_seq).is_some());
}

#[allow(
    clippy::disallowed_methods,
    reason = "the test waits for the server's clock"
)]
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
