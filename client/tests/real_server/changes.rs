//! Edits, deletes for everyone, reactions and replies through the SDK and the CLI against the
//! real binary: the SDK's methods and the `MessageChanged` events they cause on the other
//! side; `starling-cli send --reply-to`, `edit`, `react`, `delete` and a `history` that shows
//! the current state (edited, reactions, the reply's quote, the deleted placeholder); a
//! refusal is an error with its code.

use super::contacts::register;
use super::*;

#[tokio::test]
async fn sdk_and_cli_edit_delete_react_and_reply() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let _ana_id = register(&ana, "+15550400031", "Ana");
    let ben_id = register(&ben, "+15550400032", "Ben");

    // The SDK: ana writes, edits and reacts; ben's event stream hands over each change.
    let (a, _a_events) = synced_client(&server, &ana.profile).await;
    let (b, mut b_events) = synced_client(&server, &ben.profile).await;
    let to_ben = starling_client::Target::User(ben_id);
    let first = a.send_text(to_ben, "helo").await.unwrap();
    let conv = first.conversation_id;
    let edit = a.edit(conv, first.seq, "hello").await.unwrap();
    let react = b.react(conv, first.seq, "👍").await.unwrap();
    let reply = b
        .reply(
            starling_client::Target::Conversation(conv),
            first.seq,
            "hi ana",
        )
        .await
        .unwrap();
    assert_eq!(
        (edit.seq, react.seq, reply.seq),
        (first.seq + 1, first.seq + 2, first.seq + 3)
    );
    let changed = loop {
        if let Event::MessageChanged(m) = next(&mut b_events).await {
            break m;
        }
    };
    let c = changed.change.as_deref().unwrap();
    assert_eq!(
        (changed.seq, c.kind, c.target_seq),
        (edit.seq, v1::ChangeKind::Edit as i32, first.seq)
    );
    assert_eq!(&changed.body[..], b"hello");
    // Not his to edit; an over-long reaction is refused before it is queued.
    let theirs = b.edit(conv, first.seq, "mine").await.unwrap_err();
    assert!(
        matches!(&theirs, starling_client::ClientError::Server(e) if e.code() == v1::ErrorCode::PermissionDenied),
        "{theirs:?}"
    );
    assert!(b.react(conv, first.seq, &"x".repeat(65)).await.is_err());
    a.shutdown().await;
    b.shutdown().await;

    // The CLI: a reply, an edit, a reaction and a delete by their commands.
    let conv_arg = format!("conv:{conv}");
    let (ok, out) = ana.run(&[
        "send",
        "--to",
        &conv_arg,
        "--text",
        "one more",
        "--reply-to",
        &reply.seq.to_string(),
    ]);
    assert!(ok, "{out:?}");
    let second = out[0]["seq"].as_u64().unwrap();
    let (ok, out) = ana.run(&["edit", &conv_arg, &second.to_string(), "one more thing"]);
    assert!(ok && out[0]["type"] == "sent", "{out:?}");
    let (ok, out) = ana.run(&["react", &conv_arg, &reply.seq.to_string(), "🎉"]);
    assert!(ok, "{out:?}");
    let (ok, out) = ana.run(&["delete", &conv_arg, &first.seq.to_string()]);
    assert!(ok, "{out:?}");
    // Deleted is final: a second delete is refused, with its code.
    let (ok, out) = ana.run(&["delete", &conv_arg, &first.seq.to_string()]);
    assert!(!ok, "{out:?}");
    assert!(
        out.iter().any(|l| l["code"] == "FAILED_PRECONDITION"),
        "{out:?}"
    );
    let (ok, out) = ben.run(&["history", "--with", &conv_arg]);
    assert!(ok, "{out:?}");
    let at = |seq: u64| {
        out.iter()
            .find(|l| l["seq"] == seq)
            .unwrap_or_else(|| panic!("seq {seq} missing: {out:?}"))
    };
    let m1 = at(first.seq);
    assert_eq!(m1["type"], "message");
    assert_eq!(m1["deleted"], true, "{m1}");
    assert!(
        m1.get("text").is_none() && m1.get("reactions").is_none(),
        "{m1}"
    );
    let r = at(reply.seq);
    assert_eq!(r["reply_to_seq"], first.seq);
    assert_eq!(r["reply_quote"], "[deleted for everyone]", "{r}");
    assert_eq!(r["reactions"][0]["emoji"], "🎉", "{r}");
    let m2 = at(second);
    assert_eq!(
        (m2["text"].as_str(), m2["reply_quote"].as_str()),
        (Some("one more thing"), Some("hi ana")),
        "{m2}"
    );
    assert!(m2["edited_ts_ms"].as_u64().unwrap() > 0);
    let e = at(edit.seq);
    assert_eq!(
        (e["type"].as_str(), e["kind"].as_str()),
        (Some("change"), Some("edit"))
    );
    assert!(
        e.get("text").is_none_or(|t| t == ""),
        "the deleted message's edit: {e}"
    );
}
