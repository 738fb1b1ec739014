//! Codec tests at the boundary: golden vectors (bytes ⇄ decoded form) and
//! property tests (round trips, arbitrary splits, arbitrary bytes).
//!
//! Regenerate the vectors after a deliberate schema change with
//! `STARLING_BLESS=1 cargo test -p starling-protocol --test codec`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use starling_protocol::v1::{self, frame::Body};
use starling_protocol::{DecodeError, FILE_DESCRIPTOR_SET, FrameDecoder, FrameEncoder, FrameKind};

// ---------------------------------------------------------------- samples

/// The media id of a blob whose SHA-256 is the samples' `[0x5a; 32]`: its lowercase hex.
const MEDIA_ID: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn media() -> v1::MediaRef {
    v1::MediaRef {
        media_id: MEDIA_ID.into(),
        content_type: "image/jpeg".into(),
        size_bytes: 482_113,
        sha256: Bytes::from_static(&[0x5a; 32]),
        width: 1280,
        height: 960,
        duration_ms: 0,
        thumbnail: Bytes::from_static(b"\xff\xd8\xff\xe0thumb"),
        file_name: "beach.jpg".into(),
    }
}

fn message() -> v1::Message {
    v1::Message {
        conversation_id: 9_001,
        seq: 42,
        sender_user_id: 1_001,
        sender_device_id: 2,
        client_msg_id: Bytes::from_static(&[0x11; 16]),
        server_ts_ms: 1_790_000_000_123,
        content_type: "text/plain".into(),
        body: Bytes::from_static("hello, starling 👋".as_bytes()),
        media: None,
        reply_to_seq: 41,
        group_changed: None,
        ..v1::Message::default()
    }
}

/// A group event as a conversation entry (Message.group_changed).
fn group_event() -> v1::Message {
    let mut group = group_info();
    // An event's group has no member list and no count.
    group.members.clear();
    group.member_count = 0;
    group.members_next_after_user_id = 0;
    v1::Message {
        conversation_id: 77,
        seq: 5,
        sender_user_id: 1_001,
        sender_device_id: 0,
        client_msg_id: Bytes::from_static(b"\xffSTRLGRP\x00\x00\x00\x00\x00\x00\x00\x03"),
        server_ts_ms: 1_790_000_002_000,
        content_type: String::new(),
        body: Bytes::new(),
        media: None,
        reply_to_seq: 0,
        group_changed: Some(Box::new(v1::GroupChanged {
            group: Some(Box::new(group)),
            by_user_id: 1_001,
            kind: v1::GroupChangeKind::MembersAdded as i32,
            user_ids: vec![1_004],
            role: 0,
        })),
        ..v1::Message::default()
    }
}

fn phone(p: &str) -> Option<v1::Identifier> {
    Some(v1::Identifier {
        kind: Some(v1::identifier::Kind::Phone(p.into())),
    })
}

fn device_info() -> Option<v1::DeviceInfo> {
    Some(v1::DeviceInfo {
        name: "Ana's phone".into(),
        platform: "android".into(),
    })
}

fn group_info() -> v1::GroupInfo {
    v1::GroupInfo {
        conversation_id: 77,
        name: "Climbing".into(),
        avatar: None,
        members: vec![
            v1::GroupMember {
                user_id: 1_001,
                role: v1::GroupRole::Admin as i32,
                joined_at_ms: 1_790_000_000_000,
            },
            v1::GroupMember {
                user_id: 1_002,
                role: v1::GroupRole::Member as i32,
                joined_at_ms: 1_790_000_001_000,
            },
        ],
        created_by_user_id: 1_001,
        created_at_ms: 1_790_000_000_000,
        version: 3,
        only_admins_send: true,
        member_count: 5,
        members_next_after_user_id: 1_002,
    }
}

fn signed_prekey() -> v1::SignedPrekey {
    v1::SignedPrekey {
        key_id: 7,
        public_key: Bytes::from_static(&[0x05; 32]),
        signature: Bytes::from_static(&[0x0a; 64]),
    }
}

/// One representative body per frame kind. The match is exhaustive, so a new
/// frame kind cannot be added without a golden vector.
fn sample(kind: FrameKind) -> Body {
    match kind {
        FrameKind::Hello => Body::Hello(v1::Hello {
            protocol_version: 1,
            client: Some(v1::ClientInfo {
                app: "starling-cli".into(),
                version: "0.1.0".into(),
                platform: "linux".into(),
            }),
            access_token: "eyJhbGciOiJFZERTQSJ9.e30.sig".into(),
            frame_bytes_max: 65_536,
        }),
        FrameKind::Welcome => Body::Welcome(v1::Welcome {
            protocol_version: 1,
            server_version: "starling 0.1.0".into(),
            limits: Some(v1::Limits {
                frame_bytes_max: 65_536,
                body_bytes_max: 61_440,
                inflight_requests_max: 64,
                heartbeat_ms: 30_000,
                idle_timeout_ms: 90_000,
                sync_messages_max: 1_000,
            }),
            server_time_ms: 1_790_000_000_000,
            authenticated: Some(v1::AuthenticatedAs {
                user_id: 1_001,
                device_id: 1,
                session_id: 555,
            }),
            auth_error: None,
            features: vec![
                "messaging".into(),
                "history".into(),
                "conversation_list".into(),
                "block".into(),
            ],
        }),
        FrameKind::Ping => Body::Ping(v1::Ping { nonce: 12_345 }),
        FrameKind::Pong => Body::Pong(v1::Pong { nonce: 12_345 }),
        FrameKind::Error => Body::Error(v1::Error {
            code: v1::ErrorCode::RateLimited as i32,
            message: "too many OTP requests".into(),
            retry_after_ms: 30_000,
        }),
        FrameKind::Goodbye => Body::Goodbye(v1::Goodbye {
            code: v1::ErrorCode::ShuttingDown as i32,
            message: "server restarting".into(),
            reconnect_after_ms: 1_000,
        }),
        FrameKind::Authenticate => Body::Authenticate(v1::Authenticate {
            access_token: "eyJhbGciOiJFZERTQSJ9.e30.sig".into(),
        }),
        FrameKind::Done => Body::Done(v1::Done {}),
        FrameKind::RequestOtp => Body::RequestOtp(v1::RequestOtp {
            identifier: phone("+14155550100"),
        }),
        FrameKind::OtpSent => Body::OtpSent(v1::OtpSent {
            expires_at_ms: 1_790_000_300_000,
            resend_after_ms: 30_000,
            attempts_allowed: 5,
        }),
        FrameKind::VerifyOtp => Body::VerifyOtp(v1::VerifyOtp {
            identifier: phone("+14155550100"),
            code: "493027".into(),
            device: device_info(),
            display_name: "Ana".into(),
        }),
        FrameKind::Login => Body::Login(v1::Login {
            identifier: Some(v1::Identifier {
                kind: Some(v1::identifier::Kind::Email("ana@example.com".into())),
            }),
            credential: Some(v1::login::Credential::Password(
                "correct horse battery".into(),
            )),
            device: device_info(),
        }),
        FrameKind::SessionGranted => Body::SessionGranted(v1::SessionGranted {
            user_id: 1_001,
            device_id: 1,
            session_id: 555,
            access_token: "eyJhbGciOiJFZERTQSJ9.e30.sig".into(),
            access_expires_at_ms: 1_790_000_900_000,
            refresh_token: "rt_3Kq9w0ZJ".into(),
            refresh_expires_at_ms: 1_792_592_000_000,
            new_user: true,
        }),
        FrameKind::Refresh => Body::Refresh(v1::Refresh {
            refresh_token: "rt_3Kq9w0ZJ".into(),
        }),
        FrameKind::Logout => Body::Logout(v1::Logout { session_id: 0 }),
        FrameKind::SetPassword => Body::SetPassword(v1::SetPassword {
            new_password: "correct horse battery".into(),
        }),
        FrameKind::GetMe => Body::GetMe(v1::GetMe {}),
        FrameKind::Profile => Body::Profile(v1::Profile {
            user_id: 1_001,
            display_name: "Ana".into(),
            about: "climbing".into(),
            avatar: Some(Box::new(media())),
            phone: "+14155550100".into(),
            email: String::new(),
            created_at_ms: 1_790_000_000_000,
            has_password: true,
        }),
        FrameKind::UpdateProfile => Body::UpdateProfile(v1::UpdateProfile {
            display_name: Some("Ana B.".into()),
            about: None,
            avatar: None,
            clear_avatar: true,
        }),
        FrameKind::GetProfiles => Body::GetProfiles(v1::GetProfiles {
            user_ids: vec![1_002, 1_003],
        }),
        FrameKind::Profiles => Body::Profiles(v1::Profiles {
            profiles: vec![v1::Profile {
                user_id: 1_002,
                display_name: "Bo".into(),
                ..Default::default()
            }],
        }),
        FrameKind::ListDevices => Body::ListDevices(v1::ListDevices {}),
        FrameKind::DeviceList => Body::DeviceList(v1::DeviceList {
            devices: vec![
                v1::Device {
                    device_id: 1,
                    name: "Ana's phone".into(),
                    platform: "android".into(),
                    created_at_ms: 1_790_000_000_000,
                    last_seen_ms: 1_790_000_500_000,
                    current: true,
                },
                v1::Device {
                    device_id: 2,
                    name: "laptop".into(),
                    platform: "linux".into(),
                    created_at_ms: 1_790_000_100_000,
                    last_seen_ms: 0,
                    current: false,
                },
            ],
        }),
        FrameKind::RemoveDevice => Body::RemoveDevice(v1::RemoveDevice { device_id: 2 }),
        FrameKind::DiscoverContacts => Body::DiscoverContacts(v1::DiscoverContacts {
            phone_sha256: vec![
                Bytes::from_static(&[0xa1; 32]),
                Bytes::from_static(&[0xb2; 32]),
            ],
        }),
        FrameKind::ContactMatches => Body::ContactMatches(v1::ContactMatches {
            matches: vec![v1::ContactMatch {
                phone_sha256: Bytes::from_static(&[0xa1; 32]),
                user_id: 1_002,
                display_name: "Bo".into(),
            }],
        }),
        FrameKind::Block => Body::Block(v1::Block { user_id: 1_666 }),
        FrameKind::Unblock => Body::Unblock(v1::Unblock { user_id: 1_666 }),
        FrameKind::Send => Body::Send(v1::Send {
            client_msg_id: Bytes::from_static(&[0x11; 16]),
            to: Some(v1::Recipient {
                target: Some(v1::recipient::Target::UserId(1_002)),
            }),
            content_type: "text/plain".into(),
            body: Bytes::from_static("hello, starling 👋".as_bytes()),
            media: None,
            reply_to_seq: 41,
            first_attempt: true,
            change: None,
            set_timer: None,
        }),
        FrameKind::SendAck => Body::SendAck(v1::SendAck {
            client_msg_id: Bytes::from_static(&[0x11; 16]),
            conversation_id: 9_001,
            seq: 42,
            server_ts_ms: 1_790_000_000_123,
            duplicate: false,
            expires_at_ms: 1_790_086_400_123,
        }),
        FrameKind::Deliver => Body::Deliver(v1::Deliver {
            message: Some(v1::Message {
                media: Some(Box::new(media())),
                ..message()
            }),
        }),
        FrameKind::DeliveryAck => Body::DeliveryAck(v1::DeliveryAck {
            conversation_id: 9_001,
            up_to_seq: 42,
        }),
        FrameKind::ReadCursor => Body::ReadCursor(v1::ReadCursor {
            conversation_id: 9_001,
            up_to_seq: 40,
        }),
        FrameKind::Receipt => Body::Receipt(v1::Receipt {
            conversation_id: 9_001,
            up_to_seq: 42,
            kind: v1::ReceiptKind::Read as i32,
            by_user_id: 1_002,
            ts_ms: 1_790_000_000_900,
        }),
        FrameKind::GroupReceipts => Body::GroupReceipts(v1::GroupReceipts {
            conversation_id: 9_003,
            messages: vec![
                v1::GroupReceiptCount {
                    seq: 40,
                    delivered: 998,
                    read: 700,
                    recipients: 999,
                },
                v1::GroupReceiptCount {
                    seq: 42,
                    delivered: 12,
                    read: 0,
                    recipients: 999,
                },
            ],
        }),
        FrameKind::GetReceipts => Body::GetReceipts(v1::GetReceipts {
            conversation_id: 9_003,
            seq: 42,
            after_user_id: 1_001,
            limit: 3,
        }),
        FrameKind::ReceiptDetail => Body::ReceiptDetail(v1::ReceiptDetail {
            conversation_id: 9_003,
            seq: 42,
            sender_user_id: 1_001,
            delivered_user_ids: vec![1_002, 1_003, 1_004],
            read_user_ids: vec![1_003],
            recipients: 5,
            delivered: 4,
            read: 2,
            next_after_user_id: 1_004,
        }),
        FrameKind::MessagesAvailable => Body::MessagesAvailable(v1::MessagesAvailable {
            conversation_id: 9_001,
            up_to_seq: 1_042,
        }),
        FrameKind::Sync => Body::Sync(v1::Sync {
            last_seq: BTreeMap::from([(77, 0), (9_001, 40)]),
        }),
        FrameKind::SyncDone => Body::SyncDone(v1::SyncDone {
            truncated: vec![v1::MessagesAvailable {
                conversation_id: 77,
                up_to_seq: 5_000,
            }],
            messages: 1_002,
            receipts: 3,
        }),
        FrameKind::GetHistory => Body::GetHistory(v1::GetHistory {
            conversation_id: 9_001,
            anchor: Some(v1::get_history::Anchor::BeforeSeq(40)),
            limit: 50,
        }),
        FrameKind::HistoryPage => Body::HistoryPage(v1::HistoryPage {
            conversation_id: 9_001,
            messages: vec![message()],
            has_more: true,
        }),
        FrameKind::ListConversations => Body::ListConversations(v1::ListConversations {
            limit: 20,
            cursor: Bytes::from_static(b"\x00\x01"),
        }),
        FrameKind::ConversationList => Body::ConversationList(v1::ConversationList {
            conversations: vec![v1::ConversationSummary {
                conversation_id: 9_001,
                kind: v1::ConversationKind::Direct as i32,
                peer_user_id: 1_002,
                title: "Bo".into(),
                last_message: Some(Box::new(message())),
                last_seq: 42,
                unread_count: 2,
                read_up_to_seq: 40,
            }],
            next_cursor: Bytes::new(),
        }),
        FrameKind::CreateGroup => Body::CreateGroup(v1::CreateGroup {
            name: "Climbing".into(),
            member_user_ids: vec![1_002, 1_003],
            avatar: None,
        }),
        FrameKind::GroupInfo => Body::GroupInfo(group_info()),
        FrameKind::GetGroupInfo => Body::GetGroupInfo(v1::GetGroupInfo {
            conversation_id: 77,
            members_after_user_id: 1_002,
            members_limit: 2,
        }),
        FrameKind::AddGroupMembers => Body::AddGroupMembers(v1::AddGroupMembers {
            conversation_id: 77,
            user_ids: vec![1_004],
        }),
        FrameKind::RemoveGroupMembers => Body::RemoveGroupMembers(v1::RemoveGroupMembers {
            conversation_id: 77,
            user_ids: vec![1_003],
        }),
        FrameKind::SetGroupRole => Body::SetGroupRole(v1::SetGroupRole {
            conversation_id: 77,
            user_id: 1_002,
            role: v1::GroupRole::Admin as i32,
        }),
        FrameKind::LeaveGroup => Body::LeaveGroup(v1::LeaveGroup {
            conversation_id: 77,
        }),
        FrameKind::UpdateGroup => Body::UpdateGroup(v1::UpdateGroup {
            conversation_id: 77,
            name: Some("Climbing 🧗".into()),
            avatar: None,
            only_admins_send: Some(false),
        }),
        FrameKind::GroupChanged => Body::GroupChanged(v1::GroupChanged {
            group: Some(Box::new(group_info())),
            by_user_id: 1_001,
            kind: v1::GroupChangeKind::RoleChanged as i32,
            user_ids: vec![1_002],
            role: v1::GroupRole::Admin as i32,
        }),
        FrameKind::SubscribePresence => Body::SubscribePresence(v1::SubscribePresence {
            user_ids: vec![1_002, 1_003],
        }),
        FrameKind::PresenceSnapshot => Body::PresenceSnapshot(v1::PresenceSnapshot {
            users: vec![
                v1::PresenceUpdate {
                    user_id: 1_002,
                    state: v1::PresenceState::Online as i32,
                    last_seen_ms: 1_790_000_000_000,
                },
                v1::PresenceUpdate {
                    user_id: 1_003,
                    state: v1::PresenceState::Offline as i32,
                    last_seen_ms: 0,
                },
            ],
        }),
        FrameKind::UnsubscribePresence => Body::UnsubscribePresence(v1::UnsubscribePresence {
            user_ids: vec![1_003],
        }),
        FrameKind::SetPresence => Body::SetPresence(v1::SetPresence {
            state: v1::PresenceState::Away as i32,
            hide_last_seen: true,
        }),
        FrameKind::PresenceUpdate => Body::PresenceUpdate(v1::PresenceUpdate {
            user_id: 1_002,
            state: v1::PresenceState::Offline as i32,
            last_seen_ms: 1_790_000_600_000,
        }),
        FrameKind::Typing => Body::Typing(v1::Typing {
            conversation_id: 9_001,
            state: v1::TypingState::Typing as i32,
            user_id: 1_002,
        }),
        FrameKind::RequestUpload => Body::RequestUpload(v1::RequestUpload {
            content_type: "image/jpeg".into(),
            size_bytes: 482_113,
            sha256: Bytes::from_static(&[0x5a; 32]),
        }),
        FrameKind::UploadGrant => Body::UploadGrant(v1::UploadGrant {
            media_id: MEDIA_ID.into(),
            upload_url: format!(
                "https://media.example/v1/media/{MEDIA_ID}?size=482113&type=image%2Fjpeg\
                 &exp=1790000900000&sig=0f3a"
            ),
            method: "PUT".into(),
            headers: BTreeMap::from([
                ("content-length".into(), "482113".into()),
                ("content-type".into(), "image/jpeg".into()),
            ]),
            expires_at_ms: 1_790_000_900_000,
        }),
        FrameKind::RequestDownload => Body::RequestDownload(v1::RequestDownload {
            media_id: MEDIA_ID.into(),
            conversation_id: 9_001,
            seq: 42,
            user_id: 0,
        }),
        FrameKind::DownloadGrant => Body::DownloadGrant(v1::DownloadGrant {
            media_id: MEDIA_ID.into(),
            download_url: format!(
                "https://media.example/v1/media/{MEDIA_ID}?exp=1790000900000&sig=9bc1"
            ),
            expires_at_ms: 1_790_000_900_000,
        }),
        FrameKind::UploadKeys => Body::UploadKeys(v1::UploadKeys {
            identity_key: Bytes::from_static(&[0x05; 32]),
            registration_id: 4_242,
            signed_prekey: Some(signed_prekey()),
            one_time_prekeys: vec![
                v1::OneTimePrekey {
                    key_id: 100,
                    public_key: Bytes::from_static(&[0x06; 32]),
                },
                v1::OneTimePrekey {
                    key_id: 101,
                    public_key: Bytes::from_static(&[0x07; 32]),
                },
            ],
        }),
        FrameKind::PrekeyCount => Body::PrekeyCount(v1::PrekeyCount {
            one_time_prekeys: 99,
        }),
        FrameKind::FetchKeyBundles => Body::FetchKeyBundles(v1::FetchKeyBundles {
            user_id: 1_002,
            device_ids: vec![],
            list_only: false,
        }),
        FrameKind::KeyBundles => Body::KeyBundles(v1::KeyBundles {
            bundles: vec![v1::KeyBundle {
                user_id: 1_002,
                device_id: 1,
                registration_id: 4_242,
                identity_key: Bytes::from_static(&[0x05; 32]),
                signed_prekey: Some(signed_prekey()),
                one_time_prekey: Some(v1::OneTimePrekey {
                    key_id: 100,
                    public_key: Bytes::from_static(&[0x06; 32]),
                }),
            }],
        }),
        FrameKind::DeviceListChanged => Body::DeviceListChanged(v1::DeviceListChanged {
            user_id: 1_002,
            added_device_ids: vec![3],
            removed_device_ids: vec![],
        }),
        FrameKind::RegisterPushToken => Body::RegisterPushToken(v1::RegisterPushToken {
            platform: v1::PushPlatform::Fcm as i32,
            token: "fcm:APA91bH".into(),
            app_id: "org.starling.app".into(),
            sandbox: false,
        }),
        FrameKind::UnregisterPushToken => Body::UnregisterPushToken(v1::UnregisterPushToken {}),
    }
}

fn sample_frame(kind: FrameKind) -> v1::Frame {
    v1::Frame {
        // Requests and responses carry an id; pushes carry 0.
        request_id: if matches!(
            kind,
            FrameKind::Deliver
                | FrameKind::Receipt
                | FrameKind::GroupReceipts
                | FrameKind::MessagesAvailable
                | FrameKind::PresenceUpdate
                | FrameKind::Typing
                | FrameKind::GroupChanged
                | FrameKind::DeviceListChanged
                | FrameKind::Goodbye
                | FrameKind::DeliveryAck
                | FrameKind::ReadCursor
        ) {
            0
        } else {
            u64::from(kind.field_number()) + 1_000
        },
        body: Some(sample(kind)),
    }
}

fn encode(frame: &v1::Frame) -> BytesMut {
    let mut wire = BytesMut::new();
    FrameEncoder::new(u32::MAX)
        .encode(frame, &mut wire)
        .unwrap();
    wire
}

fn decode_all(chunks: &[&[u8]]) -> Vec<v1::Frame> {
    let mut decoder = FrameDecoder::new(u32::MAX);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.handle_bytes(chunk);
        while let Some(frame) = decoder.poll_frame().unwrap() {
            out.push(frame);
        }
    }
    decoder.handle_eof().unwrap();
    out
}

// ----------------------------------------------------------- golden vectors

fn frame_descriptor() -> MessageDescriptor {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET)
        .unwrap()
        .get_message_by_name("starling.v1.Frame")
        .unwrap()
}

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Proto3 canonical JSON of a frame (what other-language clients compare),
/// with object keys sorted.
fn to_json(desc: &MessageDescriptor, frame_bytes: &[u8]) -> String {
    let dynamic = DynamicMessage::decode(desc.clone(), frame_bytes).unwrap();
    // Through serde_json::Value (a BTreeMap): keys sorted, so map fields
    // print in a stable order.
    let value = serde_json::to_value(&dynamic).unwrap();
    let mut json = serde_json::to_string_pretty(&value).unwrap();
    json.push('\n');
    json
}

/// Vectors beyond one per frame kind: (file stem, frame).
fn extra_vectors() -> Vec<(&'static str, v1::Frame)> {
    vec![
        (
            // A download grant for a user's avatar rather than a message's media.
            "request_download_avatar",
            v1::Frame {
                request_id: 12,
                body: Some(Body::RequestDownload(v1::RequestDownload {
                    media_id: MEDIA_ID.into(),
                    conversation_id: 0,
                    seq: 0,
                    user_id: 1_002,
                })),
            },
        ),
        (
            // Media in an UpdateProfile: the profile's avatar.
            "update_profile_avatar",
            v1::Frame {
                request_id: 13,
                body: Some(Body::UpdateProfile(v1::UpdateProfile {
                    display_name: None,
                    about: None,
                    avatar: Some(Box::new(media())),
                    clear_avatar: false,
                })),
            },
        ),
        (
            // An edit of message 42: a Send with a change and the new content.
            "send_edit",
            v1::Frame {
                request_id: 14,
                body: Some(Body::Send(v1::Send {
                    client_msg_id: Bytes::from_static(&[0x12; 16]),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::ConversationId(9_001)),
                    }),
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"hello, starling!"),
                    change: Some(Box::new(v1::MessageChange {
                        kind: v1::ChangeKind::Edit as i32,
                        target_seq: 42,
                        emoji: String::new(),
                    })),
                    ..v1::Send::default()
                })),
            },
        ),
        (
            // A reaction to message 42, pushed like a message (a change entry).
            "deliver_reaction",
            v1::Frame {
                request_id: 0,
                body: Some(Body::Deliver(v1::Deliver {
                    message: Some(v1::Message {
                        conversation_id: 9_001,
                        seq: 44,
                        sender_user_id: 1_002,
                        sender_device_id: 1,
                        client_msg_id: Bytes::from_static(&[0x13; 16]),
                        server_ts_ms: 1_790_000_000_456,
                        change: Some(Box::new(v1::MessageChange {
                            kind: v1::ChangeKind::React as i32,
                            target_seq: 42,
                            emoji: "👍".into(),
                        })),
                        ..v1::Message::default()
                    }),
                })),
            },
        ),
        (
            // Turn on disappearing messages (one day) in conversation 9,001.
            "send_set_timer",
            v1::Frame {
                request_id: 16,
                body: Some(Body::Send(v1::Send {
                    client_msg_id: Bytes::from_static(&[0x14; 16]),
                    to: Some(v1::Recipient {
                        target: Some(v1::recipient::Target::ConversationId(9_001)),
                    }),
                    set_timer: Some(Box::new(v1::DisappearingTimer { seconds: 86_400 })),
                    ..v1::Send::default()
                })),
            },
        ),
        (
            // The timer's entry, pushed like a message.
            "deliver_timer_changed",
            v1::Frame {
                request_id: 0,
                body: Some(Body::Deliver(v1::Deliver {
                    message: Some(v1::Message {
                        conversation_id: 9_001,
                        seq: 45,
                        sender_user_id: 1_001,
                        sender_device_id: 1,
                        client_msg_id: Bytes::from_static(&[0x14; 16]),
                        server_ts_ms: 1_790_000_000_500,
                        timer_changed: Some(Box::new(v1::DisappearingTimer { seconds: 86_400 })),
                        ..v1::Message::default()
                    }),
                })),
            },
        ),
        (
            // A message sent under that timer: it disappears a day after its server_ts_ms.
            "deliver_expiring",
            v1::Frame {
                request_id: 0,
                body: Some(Body::Deliver(v1::Deliver {
                    message: Some(v1::Message {
                        conversation_id: 9_001,
                        seq: 46,
                        sender_user_id: 1_002,
                        sender_device_id: 2,
                        client_msg_id: Bytes::from_static(&[0x15; 16]),
                        server_ts_ms: 1_790_000_000_600,
                        content_type: "text/plain".into(),
                        body: Bytes::from_static(b"see you"),
                        expires_at_ms: 1_790_086_400_600,
                        ..v1::Message::default()
                    }),
                })),
            },
        ),
        (
            // History as it is now: message 42 edited, with a reaction; 43 deleted for
            // everyone (no content); 44 the edit's change entry.
            "history_page_changed",
            v1::Frame {
                request_id: 15,
                body: Some(Body::HistoryPage(v1::HistoryPage {
                    conversation_id: 9_001,
                    messages: vec![
                        v1::Message {
                            body: Bytes::from_static(b"hello, starling!"),
                            edited_ts_ms: 1_790_000_000_400,
                            reactions: vec![v1::Reaction {
                                user_id: 1_002,
                                emoji: "👍".into(),
                            }],
                            ..message()
                        },
                        v1::Message {
                            seq: 43,
                            client_msg_id: Bytes::from_static(&[0x14; 16]),
                            content_type: String::new(),
                            body: Bytes::new(),
                            reply_to_seq: 0,
                            deleted: true,
                            ..message()
                        },
                        v1::Message {
                            seq: 44,
                            client_msg_id: Bytes::from_static(&[0x12; 16]),
                            server_ts_ms: 1_790_000_000_400,
                            body: Bytes::from_static(b"hello, starling!"),
                            reply_to_seq: 0,
                            change: Some(Box::new(v1::MessageChange {
                                kind: v1::ChangeKind::Edit as i32,
                                target_seq: 42,
                                emoji: String::new(),
                            })),
                            ..message()
                        },
                    ],
                    has_more: false,
                })),
            },
        ),
        (
            // A group event, pushed like a message.
            "deliver_group_changed",
            v1::Frame {
                request_id: 0,
                body: Some(Body::Deliver(v1::Deliver {
                    message: Some(group_event()),
                })),
            },
        ),
        (
            // A listing of a user's devices that takes no one-time prekey, then a claim for
            // the one device without a session.
            "fetch_key_bundles_list_only",
            v1::Frame {
                request_id: 14,
                body: Some(Body::FetchKeyBundles(v1::FetchKeyBundles {
                    user_id: 1_002,
                    device_ids: vec![],
                    list_only: true,
                })),
            },
        ),
        (
            "fetch_key_bundles_devices",
            v1::Frame {
                request_id: 15,
                body: Some(Body::FetchKeyBundles(v1::FetchKeyBundles {
                    user_id: 1_002,
                    device_ids: vec![3],
                    list_only: false,
                })),
            },
        ),
        (
            // Hello carried a token that was refused: welcomed, not authenticated.
            "welcome_auth_error",
            v1::Frame {
                request_id: 1,
                body: Some(Body::Welcome(v1::Welcome {
                    protocol_version: 1,
                    server_version: "starling 0.1.0".into(),
                    limits: Some(v1::Limits {
                        frame_bytes_max: 65_536,
                        body_bytes_max: 61_440,
                        inflight_requests_max: 64,
                        heartbeat_ms: 30_000,
                        idle_timeout_ms: 90_000,
                        sync_messages_max: 500,
                    }),
                    server_time_ms: 1_790_000_000_000,
                    authenticated: None,
                    auth_error: Some(v1::Error {
                        code: v1::ErrorCode::TokenExpired as i32,
                        message: "access token expired".into(),
                        retry_after_ms: 0,
                    }),
                    features: starling_protocol::features::ALL[..6]
                        .iter()
                        .map(|&f| f.to_owned())
                        .collect(),
                })),
            },
        ),
    ]
}

/// The sample Sync as a standard encoder writes it: every map entry with both
/// its key and its value, the zero value included (prost omits it).
fn sync_explicit_zero_wire() -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    let frame = sample_frame(FrameKind::Sync);
    let Some(Body::Sync(sync)) = &frame.body else {
        unreachable!()
    };
    let mut entries = Vec::new();
    for (&k, &v) in &sync.last_seq {
        let len = 2 + encoded_len_varint(k) + encoded_len_varint(v);
        encode_key(1, WireType::LengthDelimited, &mut entries);
        encode_varint(len as u64, &mut entries);
        encode_key(1, WireType::Varint, &mut entries);
        encode_varint(k, &mut entries);
        encode_key(2, WireType::Varint, &mut entries);
        encode_varint(v, &mut entries);
    }
    let mut payload = Vec::new();
    encode_key(1, WireType::Varint, &mut payload);
    encode_varint(frame.request_id, &mut payload);
    encode_key(
        FrameKind::Sync.field_number(),
        WireType::LengthDelimited,
        &mut payload,
    );
    encode_varint(entries.len() as u64, &mut payload);
    payload.extend_from_slice(&entries);
    let mut wire = Vec::new();
    encode_varint(payload.len() as u64, &mut wire);
    wire.extend_from_slice(&payload);
    wire
}

/// A map entry with an explicit zero value decodes like one without it; its
/// JSON is the omitted form's. Not compared byte for byte with `sync.hex`
/// (README: maps are compared by decoding).
#[test]
fn a_zero_map_value_written_explicitly_decodes_the_same() {
    let bless = std::env::var_os("STARLING_BLESS").is_some();
    let dir = vectors_dir();
    let (hex_path, json_path) = (
        dir.join("sync_explicit_zero.hex"),
        dir.join("sync_explicit_zero.json"),
    );
    let wire = sync_explicit_zero_wire();
    // A one-byte length prefix.
    assert!(wire[0] < 0x80 && usize::from(wire[0]) == wire.len() - 1);
    let desc = frame_descriptor();
    if bless {
        std::fs::write(&hex_path, format!("{}\n", hex::encode(&wire))).unwrap();
        std::fs::write(&json_path, to_json(&desc, &wire[1..])).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&hex_path).unwrap();
    let bytes = hex::decode(committed.trim()).unwrap();
    assert_eq!(bytes, wire, "{} is stale", hex_path.display());
    let omitted = hex::decode(
        std::fs::read_to_string(dir.join("sync.hex"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_ne!(bytes, omitted, "the explicit form differs in bytes");
    let frame = sample_frame(FrameKind::Sync);
    assert_eq!(decode_all(&[&bytes]), vec![frame]);
    assert_eq!(
        to_json(&desc, &bytes[1..]),
        std::fs::read_to_string(&json_path).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(&json_path).unwrap(),
        std::fs::read_to_string(dir.join("sync.json")).unwrap()
    );
}

#[test]
fn golden_vectors() {
    let bless = std::env::var_os("STARLING_BLESS").is_some();
    let desc = frame_descriptor();
    let dir = vectors_dir();
    let vectors = FrameKind::ALL
        .iter()
        .map(|&kind| (kind.name(), sample_frame(kind)))
        .chain(extra_vectors());
    for (name, frame) in vectors {
        let kind = name;
        let wire = encode(&frame);
        let hex_text = format!("{}\n", hex::encode(&wire));
        let prefix_len = prost::encoding::encoded_len_varint(frame.encoded_len() as u64);
        let json = to_json(&desc, &wire[prefix_len..]);
        let hex_path = dir.join(format!("{name}.hex"));
        let json_path = dir.join(format!("{name}.json"));
        if bless {
            std::fs::write(&hex_path, &hex_text).unwrap();
            std::fs::write(&json_path, &json).unwrap();
            continue;
        }
        let committed_hex = std::fs::read_to_string(&hex_path).unwrap_or_else(|e| {
            panic!("{}: {e} (bless with STARLING_BLESS=1)", hex_path.display())
        });
        let committed_json = std::fs::read_to_string(&json_path).unwrap();
        assert_eq!(committed_hex, hex_text, "{} is stale", hex_path.display());
        assert_eq!(committed_json, json, "{} is stale", json_path.display());

        // The committed bytes decode to the sample...
        let bytes = hex::decode(committed_hex.trim()).unwrap();
        assert_eq!(decode_all(&[&bytes]), vec![frame.clone()], "{kind:?}");
        // ...and the committed JSON is the whole decoded form: parsed by an
        // independent (reflection-based) codec it encodes to the same frame.
        let mut de = serde_json::Deserializer::from_str(&committed_json);
        let dynamic = DynamicMessage::deserialize(desc.clone(), &mut de).unwrap();
        let from_json = v1::Frame::decode(dynamic.encode_to_vec().as_slice()).unwrap();
        assert_eq!(from_json, frame, "{kind:?}: JSON does not match hex");
    }
}

#[test]
fn every_vector_file_has_a_frame_kind() {
    let mut names: Vec<&str> = FrameKind::ALL.iter().map(|k| k.name()).collect();
    names.extend(extra_vectors().iter().map(|(name, _)| *name));
    names.push("sync_explicit_zero");
    for entry in std::fs::read_dir(vectors_dir()).unwrap() {
        let path = entry.unwrap().path();
        let (Some(stem), Some(ext)) = (path.file_stem(), path.extension()) else {
            continue;
        };
        if ext == "hex" || ext == "json" {
            let stem = stem.to_str().unwrap();
            assert!(names.contains(&stem), "stale vector {}", path.display());
        }
    }
}

#[test]
fn all_vectors_as_one_stream_split_everywhere() {
    let frames: Vec<v1::Frame> = FrameKind::ALL.iter().map(|&k| sample_frame(k)).collect();
    let mut wire = BytesMut::new();
    for f in &frames {
        wire.extend_from_slice(&encode(f));
    }
    for split in (0..wire.len()).step_by(7) {
        let (a, b) = wire.split_at(split);
        assert_eq!(decode_all(&[a, b]), frames, "split at {split}");
    }
}

#[test]
fn default_limit_rejects_a_large_body_but_negotiated_limit_accepts() {
    let frame = v1::Frame {
        request_id: 1,
        body: Some(Body::Send(v1::Send {
            body: Bytes::from(vec![0u8; 70_000]),
            ..Default::default()
        })),
    };
    let wire = encode(&frame);
    let mut d = FrameDecoder::default();
    d.handle_bytes(&wire);
    assert!(matches!(
        d.poll_frame(),
        Err(DecodeError::Oversized { max: 65_536, .. })
    ));
    let mut d = FrameDecoder::new(starling_protocol::limits::FRAME_BYTES_MAX_CEILING);
    d.handle_bytes(&wire);
    assert_eq!(d.poll_frame().unwrap(), Some(frame));
}

#[test]
fn committed_fuzz_corpus_replays_clean() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 3] = [
        ("decode_bytes", starling_protocol::fuzzing::decode_bytes),
        ("decode_split", starling_protocol::fuzzing::decode_split),
        ("roundtrip", starling_protocol::fuzzing::roundtrip),
    ];
    for (target, check) in targets {
        let mut inputs = 0;
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let path = entry.unwrap().path();
            check(&std::fs::read(&path).unwrap());
            inputs += 1;
        }
        assert!(inputs > 0, "no corpus for {target}");
    }
}

// ----------------------------------------------------------- property tests

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_message() -> impl Strategy<Value = v1::Message> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        arb_bytes(17),
        any::<u64>(),
        ".{0,12}",
        arb_bytes(300),
        any::<u64>(),
    )
        .prop_map(
            |(
                conversation_id,
                seq,
                sender_user_id,
                sender_device_id,
                client_msg_id,
                server_ts_ms,
                content_type,
                body,
                reply_to_seq,
            )| {
                v1::Message {
                    conversation_id,
                    seq,
                    sender_user_id,
                    sender_device_id,
                    client_msg_id,
                    server_ts_ms,
                    content_type,
                    body,
                    media: None,
                    reply_to_seq,
                    group_changed: None,
                    ..v1::Message::default()
                }
            },
        )
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        // Every kind, with its representative fields.
        proptest::sample::select(FrameKind::ALL).prop_map(sample),
        (
            arb_bytes(17),
            any::<u64>(),
            ".{0,20}",
            arb_bytes(500),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(client_msg_id, user, content_type, body, reply_to_seq, first_attempt)| Body::Send(
                    v1::Send {
                        client_msg_id,
                        to: Some(v1::Recipient {
                            target: Some(v1::recipient::Target::UserId(user)),
                        }),
                        content_type,
                        body,
                        media: None,
                        reply_to_seq,
                        first_attempt,
                        change: None,
                        set_timer: None,
                    }
                )
            ),
        arb_message().prop_map(|m| Body::Deliver(v1::Deliver { message: Some(m) })),
        proptest::collection::btree_map(any::<u64>(), any::<u64>(), 0..20)
            .prop_map(|last_seq| Body::Sync(v1::Sync { last_seq })),
        proptest::collection::vec(arb_message(), 0..4).prop_map(|messages| {
            Body::HistoryPage(v1::HistoryPage {
                conversation_id: 1,
                messages,
                has_more: false,
            })
        }),
        (any::<i32>(), ".{0,40}", any::<u32>()).prop_map(|(code, message, retry_after_ms)| {
            Body::Error(v1::Error {
                code,
                message,
                retry_after_ms,
            })
        }),
        (any::<u64>(), any::<u64>(), 0..3i32, any::<u64>()).prop_map(
            |(conversation_id, up_to_seq, kind, by_user_id)| Body::Receipt(v1::Receipt {
                conversation_id,
                up_to_seq,
                kind,
                by_user_id,
                ts_ms: 0,
            })
        ),
        any::<u64>().prop_map(|nonce| Body::Ping(v1::Ping { nonce })),
    ]
}

fn arb_frame() -> impl Strategy<Value = v1::Frame> {
    (any::<u64>(), arb_body()).prop_map(|(request_id, body)| v1::Frame {
        request_id,
        body: Some(body),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f));
        }
        prop_assert_eq!(decode_all(&[&wire]), frames);
    }

    #[test]
    fn any_split_decodes_the_same(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f));
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut start = 0;
        for p in points {
            chunks.push(&wire[start..p]);
            start = p;
        }
        chunks.push(&wire[start..]);
        prop_assert_eq!(decode_all(&chunks), frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        chunk in 1usize..64,
        max in 0u32..4096,
    ) {
        let mut d = FrameDecoder::new(max);
        let mut fatal = false;
        for piece in data.chunks(chunk) {
            d.handle_bytes(piece);
            loop {
                match d.poll_frame() {
                    Ok(Some(frame)) => {
                        // Whatever decodes re-encodes within the same limit
                        // or smaller (canonical form never grows past input).
                        prop_assert!(frame.body.is_some());
                    }
                    Ok(None) => break,
                    Err(e) if e.is_fatal() => { fatal = true; break; }
                    Err(_) => {}
                }
            }
            // Never buffers more than one frame's worth plus the prefix.
            prop_assert!(d.buffered_bytes() <= max as usize + 5 + chunk);
            if fatal { break; }
        }
        let _ = d.handle_eof();
    }

    #[test]
    fn corrupted_streams_never_panic(
        frames in proptest::collection::vec(arb_frame(), 1..4),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            wire.extend_from_slice(&encode(f));
        }
        for (i, x) in flips {
            let i = i.index(wire.len());
            wire[i] ^= x;
        }
        let mut d = FrameDecoder::new(u32::MAX);
        d.handle_bytes(&wire);
        let mut polls = 0;
        while let Ok(Some(_)) | Err(DecodeError::UnknownFrameType { .. }) = d.poll_frame() {
            polls += 1;
            prop_assert!(polls <= wire.len());
        }
    }
}
