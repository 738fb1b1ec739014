//! The client against a scripted server on loopback (plaintext): what the
//! group, presence and typing calls put on the wire, how their answers are
//! read, and what the driver restores on a new connection.

use bytes::BytesMut;
use starling_protocol::{FrameDecoder, FrameEncoder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::connection::Transport;

/// One accepted connection of the scripted server.
struct Peer {
    io: TcpStream,
    decoder: FrameDecoder,
}

impl Peer {
    async fn accept(listener: &TcpListener) -> Peer {
        let (io, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("no connection in time")
            .unwrap();
        let mut peer = Peer {
            io,
            decoder: FrameDecoder::default(),
        };
        let hello = peer.recv().await;
        assert!(matches!(hello.body, Some(Body::Hello(_))), "{hello:?}");
        peer.send(
            hello.request_id,
            Body::Welcome(v1::Welcome {
                protocol_version: 1,
                server_version: "scripted".into(),
                limits: Some(v1::Limits {
                    frame_bytes_max: 65536,
                    inflight_requests_max: 8,
                    ..v1::Limits::default()
                }),
                authenticated: Some(v1::AuthenticatedAs {
                    user_id: 1,
                    device_id: 1,
                    session_id: 1,
                }),
                ..v1::Welcome::default()
            }),
        )
        .await;
        peer
    }

    async fn recv(&mut self) -> v1::Frame {
        loop {
            if let Some(frame) = self.decoder.poll_frame().unwrap() {
                return frame;
            }
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                self.io.read_buf(self.decoder.read_buf()),
            )
            .await
            .expect("no frame in time")
            .unwrap();
            assert!(n > 0, "client closed");
        }
    }

    /// The next frame that is not a Ping (answered).
    async fn request(&mut self) -> (u64, Body) {
        loop {
            let f = self.recv().await;
            match f.body {
                Some(Body::Ping(p)) => {
                    self.send(f.request_id, Body::Pong(v1::Pong { nonce: p.nonce }))
                        .await;
                }
                Some(body) => return (f.request_id, body),
                None => panic!("empty frame"),
            }
        }
    }

    async fn send(&mut self, request_id: u64, body: Body) {
        let mut buf = BytesMut::new();
        FrameEncoder::default()
            .encode(
                &v1::Frame {
                    request_id,
                    body: Some(body),
                },
                &mut buf,
            )
            .unwrap();
        self.io.write_all(&buf).await.unwrap();
    }
}

async fn start(dir: &std::path::Path) -> (TcpListener, Client, Events) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let profile = Profile::open(dir).unwrap();
    profile
        .save_credentials(&Credentials {
            user_id: 1,
            device_id: 1,
            session_id: 1,
            access_token: "token".into(),
            access_expires_at_ms: u64::MAX / 2,
            refresh_token: "refresh".into(),
            refresh_expires_at_ms: u64::MAX / 2,
        })
        .unwrap();
    let connect = ConnectOptions::new(
        listener.local_addr().unwrap().to_string(),
        Transport::DangerousPlaintext,
    );
    let mut cfg = ClientConfig::new(connect, dir);
    cfg.receive_messages = false;
    cfg.backoff.base = Duration::from_millis(10);
    cfg.backoff.cap = Duration::from_millis(50);
    let (client, events) = Client::start(cfg).unwrap();
    (listener, client, events)
}

fn group(conversation_id: u64, name: &str) -> v1::GroupInfo {
    v1::GroupInfo {
        conversation_id,
        name: name.into(),
        members: vec![
            v1::GroupMember {
                user_id: 1,
                role: v1::GroupRole::Admin.into(),
                joined_at_ms: 5,
            },
            v1::GroupMember {
                user_id: 2,
                role: v1::GroupRole::Member.into(),
                joined_at_ms: 5,
            },
        ],
        version: 1,
        ..v1::GroupInfo::default()
    }
}

#[tokio::test]
async fn group_calls_put_their_request_on_the_wire_and_read_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, client, _events) = start(dir.path()).await;
    let server = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        let mut seen = Vec::new();
        for _ in 0..7 {
            let (id, body) = peer.request().await;
            let answer = match &body {
                Body::CreateGroup(c) => Body::GroupInfo(group(9, &c.name)),
                Body::LeaveGroup(_) => Body::Done(v1::Done {}),
                Body::GetGroupInfo(g) if g.conversation_id == 404 => Body::Error(v1::Error {
                    code: v1::ErrorCode::NotAMember.into(),
                    message: "not a member".into(),
                    retry_after_ms: 0,
                }),
                _ => Body::GroupInfo(group(9, "G")),
            };
            peer.send(id, answer).await;
            seen.push(body);
        }
        seen
    });
    let g = client.create_group("Climbing", &[2, 3]).await.unwrap();
    assert_eq!((g.conversation_id, g.name.as_str()), (9, "Climbing"));
    client.add_group_members(9, &[4]).await.unwrap();
    client.remove_group_members(9, &[3]).await.unwrap();
    client
        .set_group_role(9, 2, v1::GroupRole::Admin)
        .await
        .unwrap();
    client
        .update_group(v1::UpdateGroup {
            conversation_id: 9,
            name: Some("Bouldering".into()),
            ..v1::UpdateGroup::default()
        })
        .await
        .unwrap();
    client.leave_group(9).await.unwrap();
    let err = client.group_info(404).await.unwrap_err();
    assert_eq!(
        err.server().map(ServerError::code),
        Some(ErrorCode::NotAMember)
    );
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        [
            Body::CreateGroup(v1::CreateGroup {
                name: "Climbing".into(),
                member_user_ids: vec![2, 3],
                avatar: None,
            }),
            Body::AddGroupMembers(v1::AddGroupMembers {
                conversation_id: 9,
                user_ids: vec![4],
            }),
            Body::RemoveGroupMembers(v1::RemoveGroupMembers {
                conversation_id: 9,
                user_ids: vec![3],
            }),
            Body::SetGroupRole(v1::SetGroupRole {
                conversation_id: 9,
                user_id: 2,
                role: v1::GroupRole::Admin.into(),
            }),
            Body::UpdateGroup(v1::UpdateGroup {
                conversation_id: 9,
                name: Some("Bouldering".into()),
                ..v1::UpdateGroup::default()
            }),
            Body::LeaveGroup(v1::LeaveGroup { conversation_id: 9 }),
            Body::GetGroupInfo(v1::GetGroupInfo {
                conversation_id: 404,
                ..v1::GetGroupInfo::default()
            }),
        ]
    );
    client.shutdown().await;
}

/// `group_info` and `receipts` walk the pages: the members of every page
/// once, starting over when the group's version changes between pages.
#[tokio::test]
async fn group_info_and_receipts_read_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, client, _events) = start(dir.path()).await;
    let server = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        let member = |user_id| v1::GroupMember {
            user_id,
            role: v1::GroupRole::Member.into(),
            joined_at_ms: 5,
        };
        let mut asked = Vec::new();
        // The first read sees version 1, then 2 on its second page: it starts over.
        for version in [1, 2, 2, 2] {
            let (id, body) = peer.request().await;
            let Body::GetGroupInfo(g) = body else {
                panic!("expected GetGroupInfo, got {body:?}")
            };
            asked.push(g.members_after_user_id);
            let (members, next) = match g.members_after_user_id {
                0 => (vec![member(1), member(2)], 2),
                2 => (vec![member(3)], 0),
                other => panic!("after {other}"),
            };
            let info = v1::GroupInfo {
                conversation_id: 9,
                members,
                member_count: 3,
                members_next_after_user_id: next,
                version,
                ..v1::GroupInfo::default()
            };
            peer.send(id, Body::GroupInfo(info)).await;
        }
        for (after, delivered, next) in [(0, vec![2], 3), (3, vec![4], 0)] {
            let (id, body) = peer.request().await;
            let Body::GetReceipts(r) = body else {
                panic!("expected GetReceipts, got {body:?}")
            };
            assert_eq!((r.seq, r.after_user_id), (7, after));
            let d = v1::ReceiptDetail {
                conversation_id: 9,
                seq: 7,
                sender_user_id: 1,
                delivered_user_ids: delivered,
                read_user_ids: vec![],
                recipients: 3,
                delivered: 2,
                read: 0,
                next_after_user_id: next,
            };
            peer.send(id, Body::ReceiptDetail(d)).await;
        }
        asked
    });
    let info = client.group_info(9).await.unwrap();
    let ids: Vec<u64> = info.members.iter().map(|m| m.user_id).collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!((info.version, info.members_next_after_user_id), (2, 0));
    let d = client.receipts(9, 7).await.unwrap();
    assert_eq!(d.delivered_user_ids, [2, 4]);
    assert_eq!((d.delivered, d.next_after_user_id), (2, 0));
    assert_eq!(server.await.unwrap(), [0, 2, 0, 2]);
    client.shutdown().await;
}

/// Presence subscriptions and an AWAY state outlive a connection: the
/// driver sends them again on the next one and reports the new snapshot as
/// events; typing is one-way and pushes become events.
#[tokio::test]
async fn presence_is_restored_on_reconnect_and_pushes_become_events() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, client, mut events) = start(dir.path()).await;
    let snapshot = |state: v1::PresenceState, last_seen_ms| {
        Body::PresenceSnapshot(v1::PresenceSnapshot {
            users: vec![v1::PresenceUpdate {
                user_id: 5,
                state: state.into(),
                last_seen_ms,
            }],
        })
    };
    let server = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::SubscribePresence(v1::SubscribePresence {
                user_ids: vec![5, 6]
            })
        );
        peer.send(id, snapshot(v1::PresenceState::Offline, 77))
            .await;
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::UnsubscribePresence(v1::UnsubscribePresence { user_ids: vec![6] })
        );
        peer.send(id, Body::Done(v1::Done {})).await;
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::SetPresence(v1::SetPresence {
                state: v1::PresenceState::Away.into(),
                hide_last_seen: true,
            })
        );
        peer.send(id, Body::Done(v1::Done {})).await;
        let (id, body) = peer.request().await;
        assert_eq!(id, 0, "typing is one-way");
        assert_eq!(
            body,
            Body::Typing(v1::Typing {
                conversation_id: 3,
                state: v1::TypingState::Typing.into(),
                user_id: 0,
            })
        );
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::GetProfiles(v1::GetProfiles { user_ids: vec![5] })
        );
        peer.send(
            id,
            Body::Profiles(v1::Profiles {
                profiles: vec![v1::Profile {
                    user_id: 5,
                    display_name: "Eve".into(),
                    ..v1::Profile::default()
                }],
            }),
        )
        .await;
        // Pushes.
        peer.send(
            0,
            Body::PresenceUpdate(v1::PresenceUpdate {
                user_id: 5,
                state: v1::PresenceState::Online.into(),
                last_seen_ms: 0,
            }),
        )
        .await;
        peer.send(
            0,
            Body::Typing(v1::Typing {
                conversation_id: 3,
                state: v1::TypingState::Typing.into(),
                user_id: 5,
            }),
        )
        .await;
        // The connection drops; the next one gets the state and the
        // subscriptions again.
        drop(peer);
        let mut peer = Peer::accept(&listener).await;
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::SetPresence(v1::SetPresence {
                state: v1::PresenceState::Away.into(),
                hide_last_seen: true,
            })
        );
        peer.send(id, Body::Done(v1::Done {})).await;
        let (id, body) = peer.request().await;
        assert_eq!(
            body,
            Body::SubscribePresence(v1::SubscribePresence { user_ids: vec![5] })
        );
        peer.send(id, snapshot(v1::PresenceState::Away, 0)).await;
        peer
    });
    let snap = client.subscribe_presence(&[5, 6]).await.unwrap();
    assert_eq!(snap[0].last_seen_ms, 77);
    client.unsubscribe_presence(&[6]).await.unwrap();
    client
        .set_presence(v1::PresenceState::Away, true)
        .await
        .unwrap();
    client.typing(3, v1::TypingState::Typing).await.unwrap();
    let profiles = client.profiles(&[5]).await.unwrap();
    assert_eq!(profiles[0].display_name, "Eve");
    let mut got = Vec::new();
    while got.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("no event in time")
            .unwrap();
        match ev {
            Event::Presence(p) => got.push(format!("presence {} {:?}", p.user_id, p.state())),
            Event::Typing(t) => got.push(format!("typing {} {}", t.conversation_id, t.user_id)),
            _ => {}
        }
    }
    assert_eq!(
        got,
        ["presence 5 Online", "typing 3 5", "presence 5 Away"],
        "the last from the snapshot after the reconnect"
    );
    let _peer = server.await.unwrap();
    client.shutdown().await;
}
