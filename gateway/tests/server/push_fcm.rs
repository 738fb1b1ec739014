//! Issue 36 §1/§6: FCM HTTP v1 notifications through the real binary, against a local HTTPS
//! service that plays both Google's OAuth2 token endpoint (it verifies the JWT-bearer
//! assertion's RS256 signature with the service account's public key) and FCM's
//! `messages:send` (it checks the access token and the message). An offline device gets one
//! content-free message per collapse interval; the access token is fetched once and cached; a
//! 503 is retried; UNREGISTERED removes the token.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::KeyPair as _;

use super::messaging::call;
use super::push_web::{PushService, has_push_token, meta_after_kill, metric, send, unb64, user};
use super::*;

fn register_fcm(c: &mut Client, token: &str) {
    let r = call(
        c,
        Body::RegisterPushToken(v1::RegisterPushToken {
            platform: v1::PushPlatform::Fcm as i32,
            token: token.into(),
            app_id: "org.example.chat".into(),
            sandbox: false,
        }),
    );
    assert!(matches!(r, Body::Done(_)), "{r:?}");
}

#[test]
fn offline_devices_get_one_content_free_fcm_message_per_interval() {
    let keys = tempfile::tempdir().unwrap();
    let service = PushService::start(keys.path());
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = rsa.as_der().unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pkcs8.as_ref())
    );
    let token_uri = service.endpoint("/token");
    let sa = serde_json::json!({
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": "key-1",
        "private_key": pem,
        "client_email": "starling@demo.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    let sa_path = keys.path().join("service-account.json");
    std::fs::write(&sa_path, sa.to_string()).unwrap();
    let toml = format!(
        "[push]\nca_file = \"{}\"\nretry_base_ms = 100\nretry_max_ms = 500\ngrace_ms = 300\n\
         [push.fcm]\nservice_account_file = \"{}\"\nendpoint = \"{}\"\n",
        service.ca_pem.display(),
        sa_path.display(),
        service.endpoint("")
    );
    let srv = Server::start("auto", &toml);
    let (mut ana, _) = user(&srv, "ana");
    let mut ids = Vec::new();
    for name in ["ben", "cy", "dee"] {
        let (mut c, g) = user(&srv, name);
        register_fcm(&mut c, &format!("{name}:APA91b-token"));
        drop(c);
        ids.push(g);
    }
    service.script("cy:APA91b-token", &[503]);
    service.script("dee:APA91b-token", &[404]);
    let mut conv = 0;
    for i in 0..5 {
        conv = send(&mut ana, 10 + i, ids[0].user_id, "secret words").conversation_id;
    }
    send(&mut ana, 20, ids[1].user_id, "secret words");
    send(&mut ana, 30, ids[2].user_id, "secret words");
    let got = service.collect(Duration::from_secs(4));

    // One token exchange, its assertion signed with the service account's key.
    let exchanges: Vec<_> = got.iter().filter(|p| p.path == "/token").collect();
    assert_eq!(exchanges.len(), 1, "the access token is cached: {got:?}");
    let t = exchanges[0];
    assert_eq!(
        t.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    let form = String::from_utf8(t.body.clone()).unwrap();
    let assertion = form
        .strip_prefix("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=")
        .expect(&form);
    let (input, sig) = assertion.rsplit_once('.').unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        rsa.public_key().as_ref(),
    )
    .verify(input.as_bytes(), &unb64(sig))
    .expect("the assertion is signed with the service account's key");
    let (h, c) = input.split_once('.').unwrap();
    let h: serde_json::Value = serde_json::from_slice(&unb64(h)).unwrap();
    assert_eq!(
        (h["alg"].as_str(), h["kid"].as_str()),
        (Some("RS256"), Some("key-1"))
    );
    let c: serde_json::Value = serde_json::from_slice(&unb64(c)).unwrap();
    assert_eq!(c["iss"], "starling@demo.iam.gserviceaccount.com");
    assert_eq!(
        c["scope"],
        "https://www.googleapis.com/auth/firebase.messaging"
    );
    assert_eq!(c["aud"], token_uri);
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        3600
    );

    let sends: Vec<serde_json::Value> = got
        .iter()
        .filter(|p| p.path != "/token")
        .map(|p| {
            assert_eq!(p.path, "/v1/projects/demo/messages:send");
            assert_eq!(p.headers["authorization"], "Bearer at-1");
            assert_eq!(p.headers["content-type"], "application/json");
            assert!(!p.body.windows(6).any(|w| w == b"secret"), "content-free");
            serde_json::from_slice(&p.body).unwrap()
        })
        .collect();
    let to = |who: &str| {
        sends
            .iter()
            .filter(|m| m["message"]["token"] == format!("{who}:APA91b-token"))
            .collect::<Vec<_>>()
    };
    let ben = to("ben");
    assert_eq!(ben.len(), 1, "one message for the burst: {sends:?}");
    assert_eq!(
        ben[0]["message"]["data"],
        serde_json::json!({
            "v": "1",
            "conversation_id": conv.to_string(),
            "seq": "5",
            "unread_count": "5",
        })
    );
    assert_eq!(ben[0]["message"]["android"]["priority"], "high");
    assert_eq!(
        ben[0]["message"]["android"]["collapse_key"]
            .as_str()
            .unwrap()
            .len(),
        22
    );
    assert_eq!(to("cy").len(), 2, "503 then 200: {sends:?}");
    assert_eq!(to("dee").len(), 1, "UNREGISTERED: asked once: {sends:?}");
    // The three devices are notified at once, by parallel senders, each on a connection of
    // its own (the token exchange came first, on one of them); the retry reuses a kept one.
    let requests = 1 + sends.len() as u64;
    let opened = service
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&opened) && opened < requests,
        "kept-alive connections: {opened} for {requests} requests"
    );
    send(&mut ana, 15, ids[0].user_id, "more secret words");
    assert!(
        service.collect(Duration::from_secs(1)).is_empty(),
        "one per collapse interval"
    );
    assert_eq!(metric(&srv, "starling_push_sent_total"), 2);
    assert_eq!(
        metric(&srv, "starling_push_invalid_tokens_removed_total"),
        1
    );
    let (meta, _dir) = meta_after_kill(srv);
    assert!(
        !has_push_token(&meta, &ids[2]),
        "UNREGISTERED removes the token"
    );
}
