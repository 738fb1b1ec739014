//! Issue 36 §1: a device's push token through the SDK and the CLI (`push register`,
//! `push unregister`, `--json`) against the real binary; a malformed token is refused with
//! the server's INVALID_ARGUMENT, and a CLI misuse (`--sandbox` off APNs) before any request.

use starling_client::PushToken;

use super::contacts::register;
use super::*;

/// The generator of P-256, uncompressed and base64url: a valid user-agent key.
const P256_POINT: &str =
    "BGsX0fLhLEJH-Lzm5WOkQPJ3A32BLeszoPShOUXYmMKWT-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";

#[test]
fn cli_registers_and_forgets_push_tokens() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let ana = Cli {
        server: &server,
        profile: tmp.path().join("ana"),
    };
    register(&ana, "+15550300001", "Ana");
    let (ok, out) = ana.run(&[
        "push",
        "register",
        "--platform",
        "fcm",
        "--token",
        "dX:APA91b-tok",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "push_registered");
    assert_eq!(out[0]["platform"], "fcm");
    assert!(out[0]["device_id"].as_u64().unwrap() > 0);
    let sub = format!(
        r#"{{"endpoint":"https://push.example.net/w/1","keys":{{"p256dh":"{P256_POINT}","auth":"AAECAwQFBgcICQoLDA0ODw"}}}}"#
    );
    let (ok, out) = ana.run(&[
        "push",
        "register",
        "--platform",
        "web-push",
        "--token",
        &sub,
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["platform"], "web_push");
    let (ok, out) = ana.run(&[
        "push",
        "register",
        "--platform",
        "apns",
        "--token",
        &"ab".repeat(32),
        "--app-id",
        "org.example.chat",
        "--sandbox",
    ]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["platform"], "apns");
    // Refused by the server: the error names the code and the field.
    let (ok, out) = ana.run(&["push", "register", "--platform", "apns", "--token", "zz"]);
    assert!(!ok);
    assert_eq!(out[0]["type"], "error");
    assert_eq!(out[0]["code"], "INVALID_ARGUMENT");
    assert!(
        out[0]["message"].as_str().unwrap().contains("app_id"),
        "{out:?}"
    );
    // Refused by the CLI.
    let (ok, out) = ana.run(&[
        "push",
        "register",
        "--platform",
        "fcm",
        "--token",
        "abc",
        "--sandbox",
    ]);
    assert!(!ok);
    assert_eq!(out[0]["code"], "CLIENT");
    assert!(
        out[0]["message"].as_str().unwrap().contains("--sandbox"),
        "{out:?}"
    );
    for _ in 0..2 {
        let (ok, out) = ana.run(&["push", "unregister"]);
        assert!(ok, "{out:?}");
        assert_eq!(out[0]["type"], "push_unregistered");
    }
}

#[tokio::test]
async fn sdk_registers_and_forgets_a_push_token() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let ana = Cli {
        server: &server,
        profile: tmp.path().join("ana"),
    };
    register(&ana, "+15550300002", "Ana");
    let (c, _events) = synced_client(&server, &ana.profile).await;
    c.register_push_token(&PushToken::Fcm {
        token: "dX:APA91b-sdk".into(),
        app_id: "org.example.chat".into(),
    })
    .await
    .unwrap();
    let e = c
        .register_push_token(&PushToken::WebPush {
            subscription_json: r#"{"endpoint":"http://insecure/","keys":{"p256dh":"","auth":""}}"#
                .into(),
        })
        .await
        .unwrap_err();
    let s = e.server().expect("a server error");
    assert_eq!(s.code(), v1::ErrorCode::InvalidArgument, "{s:?}");
    assert!(s.message.contains("https://"), "{}", s.message);
    c.unregister_push_token().await.unwrap();
    c.shutdown().await;
}
