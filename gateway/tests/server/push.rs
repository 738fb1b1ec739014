//! Issue 36 §1: RegisterPushToken / UnregisterPushToken per device through the real binary:
//! answered Done once durable (the token is in meta.redb after a SIGKILL), one token per device
//! (registering again replaces it), every malformed token refused with INVALID_ARGUMENT naming
//! the field and harming nothing (the stored token and the connection stay), and the token goes
//! with its device.

use starling_storage::AccountStore as _;
use starling_storage::{DeviceId, EmbeddedMeta, UserId};

use super::*;

/// The generator of P-256, uncompressed and base64url: a valid user-agent key.
const P256_POINT: &str =
    "BGsX0fLhLEJH-Lzm5WOkQPJ3A32BLeszoPShOUXYmMKWT-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";
const AUTH: &str = "AAECAwQFBgcICQoLDA0ODw";

fn token(platform: v1::PushPlatform, token: &str, app_id: &str) -> Body {
    Body::RegisterPushToken(v1::RegisterPushToken {
        platform: platform as i32,
        token: token.into(),
        app_id: app_id.into(),
        sandbox: false,
    })
}

fn subscription(endpoint: &str, p256dh: &str, auth: &str) -> String {
    format!(
        r#"{{"endpoint":"{endpoint}","expirationTime":null,"keys":{{"p256dh":"{p256dh}","auth":"{auth}"}}}}"#
    )
}

fn done(c: &mut Client, body: Body) {
    let r = c.request(body);
    assert!(matches!(r, Body::Done(_)), "{r:?}");
}

/// Kills the server (SIGKILL) and reads what meta.redb holds for the device.
fn stored_after_kill9(
    srv: Server,
    user: u64,
    device: u32,
) -> Option<starling_storage::meta::PushToken> {
    let Server { mut child, dir, .. } = srv;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let meta = EmbeddedMeta::open(&dir.path().join("data/meta.redb")).unwrap();
    meta.push_token(UserId(user), DeviceId(device)).unwrap()
}

#[test]
fn push_tokens_are_durable_one_per_device_and_replaced() {
    for driver in DRIVERS {
        let srv = Server::start(driver, "");
        let mut c = srv.hello("");
        // Before authentication: refused.
        assert_eq!(
            err_code(&c.request(token(v1::PushPlatform::Fcm, "abc", ""))),
            ErrorCode::Unauthenticated
        );
        let g = register(&srv, &mut c, email("ana@example.org"), "ana@example.org");
        let Body::Welcome(w) = srv.connect().request(Body::Hello(v1::Hello {
            protocol_version: 1,
            ..Default::default()
        })) else {
            panic!()
        };
        assert!(w.features.iter().any(|f| f == "push"), "{:?}", w.features);

        done(
            &mut c,
            token(v1::PushPlatform::Fcm, "dX:APA91b-first", "org.x"),
        );
        // Unregister, twice (the second finds none: Done all the same).
        done(
            &mut c,
            Body::UnregisterPushToken(v1::UnregisterPushToken {}),
        );
        done(
            &mut c,
            Body::UnregisterPushToken(v1::UnregisterPushToken {}),
        );
        done(
            &mut c,
            Body::RegisterPushToken(v1::RegisterPushToken {
                platform: v1::PushPlatform::Apns as i32,
                token: "AB".repeat(32),
                app_id: "org.example.chat".into(),
                sandbox: true,
            }),
        );
        // Replaced by a Web Push subscription: the last registration is what is stored.
        let sub = subscription("https://push.example.net/wpush/v2/abc", P256_POINT, AUTH);
        done(&mut c, token(v1::PushPlatform::WebPush, &sub, ""));
        let t = stored_after_kill9(srv, g.user_id, g.device_id).expect("durable token");
        assert_eq!(t.provider, "web_push");
        let v: serde_json::Value = serde_json::from_slice(&t.token).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "endpoint": "https://push.example.net/wpush/v2/abc",
                "keys": { "p256dh": P256_POINT, "auth": AUTH },
            })
        );
        assert!(!t.sandbox);
    }
}

#[test]
fn malformed_push_tokens_are_refused_and_harm_nothing() {
    let srv = Server::start("auto", "");
    let mut c = srv.hello("");
    let g = register(&srv, &mut c, email("bo@example.org"), "bo@example.org");
    done(&mut c, token(v1::PushPlatform::Fcm, "kept-token", ""));
    let ok_sub = |endpoint: &str, key: &str, auth: &str| subscription(endpoint, key, auth);
    let off_curve =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, [4u8; 65]);
    let apns = |t: &str, app_id: &str, sandbox: bool| {
        Body::RegisterPushToken(v1::RegisterPushToken {
            platform: v1::PushPlatform::Apns as i32,
            token: t.into(),
            app_id: app_id.into(),
            sandbox,
        })
    };
    let cases: Vec<(Body, &str)> = vec![
        (token(v1::PushPlatform::Unspecified, "abc", ""), "platform"),
        (
            Body::RegisterPushToken(v1::RegisterPushToken {
                platform: 42,
                token: "abc".into(),
                ..Default::default()
            }),
            "platform",
        ),
        (token(v1::PushPlatform::Fcm, "", ""), "empty"),
        (token(v1::PushPlatform::Fcm, &"a".repeat(4097), ""), "4096"),
        (token(v1::PushPlatform::Fcm, "has space", ""), "FCM"),
        (token(v1::PushPlatform::Fcm, "abc", "bad app id"), "app_id"),
        (
            Body::RegisterPushToken(v1::RegisterPushToken {
                platform: v1::PushPlatform::Fcm as i32,
                token: "abc".into(),
                app_id: String::new(),
                sandbox: true,
            }),
            "sandbox",
        ),
        (apns(&"ab".repeat(32), "", false), "app_id"),
        (apns("not hex", "org.x", false), "hex"),
        (apns(&"ab".repeat(8), "org.x", false), "32 to 100 bytes"),
        (
            token(v1::PushPlatform::WebPush, "{}", ""),
            "subscription JSON",
        ),
        (
            token(
                v1::PushPlatform::WebPush,
                &ok_sub("http://push.example.net/w", P256_POINT, AUTH),
                "",
            ),
            "https://",
        ),
        (
            token(
                v1::PushPlatform::WebPush,
                &ok_sub("https://push.example.net/w", "AAAA", AUTH),
                "",
            ),
            "p256dh",
        ),
        (
            token(
                v1::PushPlatform::WebPush,
                &ok_sub("https://push.example.net/w", &off_curve, AUTH),
                "",
            ),
            "not a point",
        ),
        (
            token(
                v1::PushPlatform::WebPush,
                &ok_sub("https://push.example.net/w", P256_POINT, "AAAA"),
                "",
            ),
            "keys.auth",
        ),
    ];
    for (body, why) in cases {
        let r = c.request(body.clone());
        let Body::Error(e) = &r else {
            panic!("{body:?}: {r:?}")
        };
        assert_eq!(e.code, ErrorCode::InvalidArgument as i32, "{body:?}: {e:?}");
        assert!(e.message.contains(why), "{why}: {}", e.message);
    }
    // The connection still works, and the token registered before is untouched.
    assert!(matches!(
        c.request(Body::Ping(v1::Ping { nonce: 7 })),
        Body::Pong(_)
    ));
    let t = stored_after_kill9(srv, g.user_id, g.device_id).expect("token kept");
    assert_eq!(
        (t.provider.as_str(), t.token.as_slice()),
        ("fcm", &b"kept-token"[..])
    );
}

#[test]
fn a_removed_device_loses_its_push_token() {
    let srv = Server::start("auto", "");
    let mut a = srv.hello("");
    let g = register(&srv, &mut a, email("cy@example.org"), "cy@example.org");
    // A second device of the same user registers a token, then is removed from the first.
    let mut b = srv.hello("");
    assert!(matches!(
        b.request(Body::RequestOtp(v1::RequestOtp {
            identifier: email("cy@example.org"),
        })),
        Body::OtpSent(_)
    ));
    let Body::SessionGranted(g2) = b.request(Body::Login(v1::Login {
        identifier: email("cy@example.org"),
        credential: Some(v1::login::Credential::OtpCode(
            srv.code_for("cy@example.org"),
        )),
        device: None,
    })) else {
        panic!()
    };
    done(&mut b, token(v1::PushPlatform::Fcm, "second-device", ""));
    done(&mut a, token(v1::PushPlatform::Fcm, "first-device", ""));
    done(
        &mut a,
        Body::RemoveDevice(v1::RemoveDevice {
            device_id: g2.device_id,
        }),
    );
    let Server { mut child, dir, .. } = srv;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let meta = EmbeddedMeta::open(&dir.path().join("data/meta.redb")).unwrap();
    assert_eq!(
        meta.push_token(UserId(g.user_id), DeviceId(g2.device_id))
            .unwrap(),
        None
    );
    assert!(
        meta.push_token(UserId(g.user_id), DeviceId(g.device_id))
            .unwrap()
            .is_some()
    );
}
