//! Group receipts through the SDK and the CLI against the real binary: the
//! sender's aggregate counts arrive as an event, the detail by a call and
//! by `starling-cli receipts`.

use super::contacts::register;
use super::*;

#[tokio::test]
async fn sdk_group_receipt_counts_and_detail_and_cli_receipts() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let ana_id = register(&ana, "+15550300021", "Ana");
    let ben_id = register(&ben, "+15550300022", "Ben");
    let (a, mut a_events) = synced_client(&server, &ana.profile).await;
    let (b, mut b_events) = synced_client(&server, &ben.profile).await;
    let gid = a
        .create_group("Counts", &[ben_id])
        .await
        .unwrap()
        .conversation_id;
    a.send_text(starling_client::Target::Conversation(gid), "count me")
        .await
        .unwrap();
    // Ben's SDK stores it and acknowledges it; Ben reads it.
    let seq = loop {
        if let Event::Message(m) = next(&mut b_events).await
            && m.conversation_id == gid
        {
            break m.seq;
        }
    };
    b.mark_read(gid, seq).await.unwrap();
    // Ana sees the counts rise to 1 of 1 received and read.
    loop {
        if let Event::GroupReceipts(g) = next(&mut a_events).await {
            assert_eq!(g.conversation_id, gid);
            let m = g.messages.iter().find(|m| m.seq == seq).unwrap();
            assert_eq!(m.recipients, 1);
            if (m.delivered, m.read) == (1, 1) {
                break;
            }
        }
    }
    let d = a.receipts(gid, seq).await.unwrap();
    assert_eq!(
        (d.sender_user_id, d.delivered_user_ids, d.read_user_ids),
        (ana_id, vec![ben_id], vec![ben_id])
    );
    a.shutdown().await;
    b.shutdown().await;
    let (ok, out) = ana.run(&[
        "receipts",
        "--group",
        &format!("group:{gid}"),
        "--seq",
        &seq.to_string(),
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "receipt_detail");
    assert_eq!(out[0]["read_user_ids"], serde_json::json!([ben_id]));
    let (ok, out) = ana.run(&["receipts", "--group", &format!("group:{gid}"), "--seq", "0"]);
    assert!(!ok, "{out:?}");
}
