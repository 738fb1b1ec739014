//! Groups through the CLI and the SDK against the real binary: create,
//! info, add, remove, role, leave, update, `send --to group:<id>`, group
//! events live, in sync and in history.

use super::contacts::register;
use super::*;

fn code(out: &[Value]) -> &str {
    out[0]["code"].as_str().unwrap_or_default()
}

fn member_roles(group: &Value) -> Vec<(u64, String)> {
    group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Ana creates a group with Ben and Cy by phone number, messages it, makes
/// Ben admin; Ben removes Cy (who can no longer send), renames it; the
/// last admin cannot leave until someone else is admin; Ana leaves; Ben
/// adds Cy back. Ben's sync and history show the group events in order
/// with the messages, and `chats` lists the group by name.
#[test]
fn cli_group_lifecycle() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben, cy) = (cli("ana"), cli("ben"), cli("cy"));
    let ana_id = register(&ana, "+15550300001", "Ana");
    let ben_id = register(&ben, "+15550300002", "Ben");
    let cy_id = register(&cy, "+15550300003", "Cy");

    let (ok, out) = ana.run(&[
        "group",
        "create",
        "--name",
        "Climbing",
        "--members",
        "+15550300002,+15550300003",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "group");
    assert_eq!(out[0]["name"], "Climbing");
    let gid = out[0]["conversation_id"].as_u64().unwrap();
    let group = format!("group:{gid}");
    let mut expected = vec![
        (ana_id, "admin".to_owned()),
        (ben_id, "member".to_owned()),
        (cy_id, "member".to_owned()),
    ];
    expected.sort();
    assert_eq!(member_roles(&out[0]), expected);

    let (ok, out) = ana.run(&["send", "--to", &group, "--text", "Saturday at 9?"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["conversation_id"], gid);
    let (ok, out) = cy.run(&["send", "--to", &group, "--text", "in"]);
    assert!(ok, "{out:?}");

    let (ok, out) = ana.run(&[
        "group",
        "role",
        "--group",
        &group,
        "--user",
        "+15550300002",
        "--role",
        "admin",
    ]);
    assert!(ok, "{out:?}");
    assert!(member_roles(&out[0]).contains(&(ben_id, "admin".to_owned())));

    // Ben, now admin, removes Cy; Cy's next message is refused.
    let gid_s = gid.to_string();
    let (ok, out) = ben.run(&[
        "group",
        "remove",
        "--group",
        &gid_s,
        "--users",
        &cy_id.to_string(),
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["members"].as_array().unwrap().len(), 2);
    let (ok, out) = cy.run(&["send", "--to", &group, "--text", "still here?"]);
    assert!(!ok);
    assert_eq!(code(&out), "NOT_A_MEMBER", "{out:?}");
    let (ok, out) = cy.run(&["group", "info", "--group", &group]);
    assert!(!ok);
    assert_eq!(code(&out), "NOT_A_MEMBER", "{out:?}");

    let (ok, out) = ben.run(&["group", "update", "--group", &group, "--name", "Bouldering"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["name"], "Bouldering");

    // Ben demotes Ana; then Ben, the last admin, cannot leave.
    let (ok, out) = ben.run(&[
        "group",
        "role",
        "--group",
        &group,
        "--user",
        &ana_id.to_string(),
        "--role",
        "member",
    ]);
    assert!(ok, "{out:?}");
    let (ok, out) = ben.run(&["group", "leave", "--group", &group]);
    assert!(!ok);
    assert_eq!(code(&out), "PERMISSION_DENIED", "{out:?}");
    // Ana, a member, may leave.
    let (ok, out) = ana.run(&["group", "leave", "--group", &group]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "left_group");
    let (ok, out) = ben.run(&["group", "add", "--group", &group, "--users", "+15550300003"]);
    assert!(ok, "{out:?}");
    let mut expected = vec![(ben_id, "admin".to_owned()), (cy_id, "member".to_owned())];
    expected.sort();
    assert_eq!(member_roles(&out[0]), expected);
    let (ok, out) = ben.run(&["group", "info", "--group", &group]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["name"], "Bouldering");

    // Ben's sync: the events and the messages, in seq order.
    let (ok, out) = ben.run(&["sync"]);
    assert!(ok, "{out:?}");
    let entries: Vec<&Value> = out
        .iter()
        .filter(|v| {
            v["conversation_id"] == gid && (v["type"] == "message" || v["type"] == "group_changed")
        })
        .collect();
    let kinds: Vec<String> = entries
        .iter()
        .map(|v| {
            if v["type"] == "message" {
                format!("message {}", v["text"].as_str().unwrap())
            } else {
                format!("group_changed {}", v["kind"].as_str().unwrap())
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "group_changed created",
            "message Saturday at 9?",
            "message in",
            "group_changed role_changed",
            "group_changed members_removed",
            "group_changed updated",
            "group_changed role_changed",
            "group_changed member_left",
            "group_changed members_added",
        ],
        "{out:?}"
    );
    let seqs: Vec<u64> = entries.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // History shows the same entries.
    let (ok, out) = ben.run(&["history", "--with", &group]);
    assert!(ok, "{out:?}");
    let n = out
        .iter()
        .filter(|v| v["type"] == "message" || v["type"] == "group_changed")
        .count();
    assert_eq!(n, kinds.len(), "{out:?}");
    assert!(out.iter().any(|v| v["type"] == "group_changed"
        && v["kind"] == "members_removed"
        && v["user_ids"][0] == cy_id));

    // The conversation list names the group.
    let (ok, out) = ben.run(&["chats"]);
    assert!(ok, "{out:?}");
    let line = out.iter().find(|v| v["conversation_id"] == gid).unwrap();
    assert_eq!(line["kind"], "group");
    assert_eq!(line["title"], "Bouldering");

    // Cy, added back, sees from the new join on only: its sync has no
    // message of the time it was out.
    let (ok, out) = cy.run(&["sync"]);
    assert!(ok, "{out:?}");
    assert!(
        out.iter()
            .any(|v| v["type"] == "group_changed" && v["kind"] == "members_added"),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|v| v["text"] == "Saturday at 9?"),
        "history before the latest join is not visible: {out:?}"
    );
    // Only admins send: Cy (a member) is refused, Ben (admin) is not.
    let (ok, out) = ben.run(&[
        "group",
        "update",
        "--group",
        &group,
        "--only-admins-send",
        "true",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["only_admins_send"], true);
    let (ok, out) = cy.run(&["send", "--to", &group, "--text", "may I?"]);
    assert!(!ok);
    assert_eq!(code(&out), "PERMISSION_DENIED", "{out:?}");
    let (ok, out) = ben.run(&["send", "--to", &group, "--text", "announcement"]);
    assert!(ok, "{out:?}");
}

/// The SDK: a member's client gets the group's events live, in order with
/// the messages, as `Event::GroupChanged`.
#[tokio::test]
async fn sdk_group_events_arrive_live() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben) = (cli("ana"), cli("ben"));
    let ana_id = register(&ana, "+15550300011", "Ana");
    let ben_id = register(&ben, "+15550300012", "Ben");
    let (a, _a_events) = synced_client(&server, &ana.profile).await;
    let (b, mut b_events) = synced_client(&server, &ben.profile).await;
    let g = a.create_group("Live", &[ben_id]).await.unwrap();
    let gid = g.conversation_id;
    a.send_text(starling_client::Target::Conversation(gid), "hello group")
        .await
        .unwrap();
    a.update_group(v1::UpdateGroup {
        conversation_id: gid,
        name: Some("Live 2".into()),
        ..v1::UpdateGroup::default()
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match next(&mut b_events).await {
            Event::GroupChanged {
                conversation_id,
                seq,
                change,
                ..
            } if conversation_id == gid => {
                assert_eq!(change.by_user_id, ana_id);
                seen.push((seq, format!("{:?}", change.kind())));
            }
            Event::Message(m) if m.conversation_id == gid => {
                seen.push((m.seq, String::from_utf8(m.body.to_vec()).unwrap()));
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            (1, "Created".to_owned()),
            (2, "hello group".to_owned()),
            (3, "Updated".to_owned())
        ]
    );
    let info = b.group_info(gid).await.unwrap();
    assert_eq!(info.name, "Live 2");
    b.leave_group(gid).await.unwrap();
    let err = b.group_info(gid).await.unwrap_err();
    assert_eq!(err.server().unwrap().code(), v1::ErrorCode::NotAMember);
    a.shutdown().await;
    b.shutdown().await;
}
