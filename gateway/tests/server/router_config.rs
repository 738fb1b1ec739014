//! The router's settings come from the configuration file's `[router]` table: a server started
//! with other limits than the defaults advertises them in `Welcome` and applies them to Send,
//! GetHistory and Sync; a table whose values contradict each other is refused at start-up with
//! the key named.

use super::*;

fn welcome_limits(c: &mut Client) -> v1::Limits {
    match c.request(Body::Hello(v1::Hello {
        protocol_version: 1,
        ..Default::default()
    })) {
        Body::Welcome(w) => w.limits.expect("Welcome carries the limits"),
        other => panic!("{other:?}"),
    }
}

fn sized(cmid: u8, to: u64, len: usize) -> Body {
    let Body::Send(mut s) = text(cmid, to, "") else {
        unreachable!()
    };
    s.body = vec![b'x'; len].into();
    Body::Send(s)
}

#[test]
fn router_settings_from_the_config_file_reach_the_router_and_welcome() {
    let srv = Server::start(
        "auto",
        "[router]\nbody_bytes_max = 100\nsync_messages_max = 3\nhistory_limit_default = 2\n",
    );
    let limits = welcome_limits(&mut srv.connect());
    assert_eq!((limits.body_bytes_max, limits.sync_messages_max), (100, 3));
    let (mut a, _ga, _b, gb) = ana_and_ben(&srv);
    let ub = gb.user_id;
    let Body::Error(e) = call(&mut a, sized(1, ub, 101)) else {
        panic!("a body over the limit was accepted")
    };
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            ErrorCode::BodyTooLarge as i32,
            "body is 101 bytes, limit 100"
        )
    );
    let mut conv = 0;
    for cmid in 2..=5 {
        match call(&mut a, sized(cmid, ub, 100)) {
            Body::SendAck(ack) => conv = ack.conversation_id,
            other => panic!("{other:?}"),
        }
    }
    // A page without a limit holds `history_limit_default` messages.
    let page = call(
        &mut a,
        Body::GetHistory(v1::GetHistory {
            conversation_id: conv,
            ..Default::default()
        }),
    );
    let Body::HistoryPage(page) = page else {
        panic!("{page:?}")
    };
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!((seqs, page.has_more), (vec![3, 4], true));
    // A Sync returns `sync_messages_max` messages of the conversation and says there is more.
    let mut b = srv.hello(&gb.access_token);
    b.send(9, Body::Sync(v1::Sync::default()));
    let (done, before) = recv_until(&mut b, |f| {
        f.request_id == 9 && matches!(f.body, Some(Body::SyncDone(_)))
    });
    let delivered = before
        .iter()
        .filter(|f| f.request_id == 9 && matches!(f.body, Some(Body::Deliver(_))))
        .count();
    assert_eq!(delivered, 3);
    let Some(Body::SyncDone(done)) = done.body else {
        unreachable!()
    };
    assert_eq!(
        done.truncated,
        [v1::MessagesAvailable {
            conversation_id: conv,
            up_to_seq: 4,
        }]
    );
}

#[test]
fn router_settings_that_contradict_each_other_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    for (toml, key) in [
        (
            "[router]\nbatch_bytes_max = 2097152\nopen_bytes_max = 1048576\n",
            "router.batch_bytes_max",
        ),
        (
            "[router]\nhistory_limit_default = 300\n",
            "router.history_limit_default",
        ),
    ] {
        std::fs::write(&cfg, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{toml}: {err}");
        assert!(!dir.path().join("data").exists(), "nothing was opened");
    }
}
