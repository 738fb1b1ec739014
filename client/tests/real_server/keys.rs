//! The end-to-end key directory through the CLI and the SDK against the real binary: `keys
//! upload|count|fetch --json`, the SDK's upload and fetch helpers, and the `PrekeyCount` and
//! `DeviceListChanged` events.

use super::contacts::register;
use super::*;

/// Ana uploads keys with the CLI (generated and kept in her profile) and tops them up; Ben,
/// who shares a conversation with her, fetches her bundle with the CLI (signature valid, one
/// one-time prekey each time, the lowest first) and with the SDK, which also sees the
/// low-stock push on Ana's client and DeviceListChanged when Ana signs in a new device. A
/// user sharing nothing with Ana gets no bundle; a bad upload is refused with its code.
#[tokio::test]
async fn keys_through_the_cli_and_the_sdk() {
    let bin = server_binary();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&bin, &tmp.path().join("data"), "127.0.0.1:0");
    let cli = |name: &str| Cli {
        server: &server,
        profile: tmp.path().join(name),
    };
    let (ana, ben, cy) = (cli("ana"), cli("ben"), cli("cy"));
    let ana_id = register(&ana, "+15550700001", "Ana");
    register(&ben, "+15550700002", "Ben");
    register(&cy, "+15550700003", "Cy");
    let (ok, out) = ben.run(&["send", "--to", "+15550700001", "--text", "hi"]);
    assert!(ok, "{out:?}");

    let (ok, out) = ana.run(&["keys", "count"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["one_time_prekeys"], 0);
    let (ok, out) = ana.run(&["keys", "upload", "--one-time", "21"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["type"], "prekey_count");
    assert_eq!(out[0]["one_time_prekeys"], 21);
    assert_eq!(out[0]["published_identity"], true);
    let identity = out[0]["identity_key_hex"].as_str().unwrap().to_owned();
    assert!(ana.profile.join("olm.json").exists());
    let (ok, out) = ana.run(&["keys", "upload", "--one-time", "5"]);
    assert!(ok, "{out:?}");
    assert_eq!(out[0]["one_time_prekeys"], 26);
    assert_eq!(out[0]["published_identity"], false);
    assert_eq!(out[0]["identity_key_hex"], identity.as_str());
    let (ok, out) = ana.run(&["keys", "upload", "--one-time", "101"]);
    assert!(!ok, "{out:?}");

    let (ok, out) = ben.run(&["keys", "fetch", "--user", "+15550700001"]);
    assert!(ok, "{out:?}");
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["type"], "key_bundle");
    assert_eq!(out[0]["user_id"], ana_id);
    assert_eq!(out[0]["identity_key_hex"], identity.as_str());
    assert_eq!(out[0]["signature_valid"], true);
    assert_eq!(out[0]["one_time_prekey"]["key_id"], 1);
    let (ok, out) = cy.run(&["keys", "fetch", "--user", &ana_id.to_string()]);
    assert!(ok, "{out:?}");
    assert!(
        out.is_empty(),
        "cy shares no conversation with ana: {out:?}"
    );

    // The SDK: Ana's client sees the low-stock push, Ben's fetches.
    let connect = ConnectOptions::new(
        server.addr.to_string(),
        Transport::Tls(TlsTrust::CaFile(server.ca())),
    );
    let (a, mut a_events) =
        Client::start(ClientConfig::new(connect.clone(), &ana.profile)).unwrap();
    let (b, mut b_events) =
        Client::start(ClientConfig::new(connect.clone(), &ben.profile)).unwrap();
    for events in [&mut a_events, &mut b_events] {
        while !matches!(next(events).await, Event::Connected { .. }) {}
    }
    assert_eq!(a.prekey_count().await.unwrap(), 25);
    for want in 2..=6 {
        let got = b.fetch_key_bundles(ana_id, &[]).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(starling_client::e2e::verify_bundle(&got[0]));
        assert_eq!(got[0].one_time_prekey.as_ref().unwrap().key_id, want);
    }
    // 25 → 20 so far; the next takes it below 20.
    b.fetch_key_bundles(ana_id, &[]).await.unwrap();
    loop {
        if let Event::PrekeyCount(n) = next(&mut a_events).await {
            assert_eq!(n, 19);
            break;
        }
    }
    // A bad upload: its code comes back.
    let bad = a
        .upload_keys(v1::UploadKeys {
            identity_key: vec![1; 31].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("32 bytes"), "{bad}");

    // Ana signs in on a second device: Ben hears of it.
    let ana2 = cli("ana2");
    register(&ana2, "+15550700001", "Ana");
    loop {
        if let Event::DeviceListChanged(d) = next(&mut b_events).await
            && d.user_id == ana_id
        {
            assert_eq!(d.added_device_ids.len(), 1);
            break;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}
